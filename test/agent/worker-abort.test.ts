/**
 * A worker's side of recovery over a real libp2p stream on 127.0.0.1, the test playing the master:
 * heartbeats when idle, `abort` of a pass stuck in an allreduce (answered `aborted`, never reported as an error),
 * stale `forward` and `ar` frames of the aborted epoch ignored, and a second plan and shard on the same stream that
 * then computes normally.
 */
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { allreduceTag } from '../../agent/shard-runner.ts'
import { loadModel, type ModelDescription, planTensorParallel } from '../../splitter/index.ts'
import { shardTensorFrames, startWorkerSession, type TensorFrame, type WorkerSession } from '../support/worker-session.ts'
import { HAVE_MODELS, MODELS_DIR } from '../support/cli.ts'
import { seededRandom } from '../support/random.ts'

/** Shard 1 of an even 2-way plan: the plan and its tensor frames in send order. */
function shardOne(model: ModelDescription): { plan: ReturnType<typeof planTensorParallel>; tensors: TensorFrame[] } {
  const plan = planTensorParallel(model.config, 2)
  return { plan, tensors: shardTensorFrames(model, plan, 1) }
}

describe.skipIf(!HAVE_MODELS)('a worker told to abort (recovery, real libp2p stream)', () => {
  let session: WorkerSession
  beforeAll(async () => {
    session = await startWorkerSession()
  })
  afterAll(async () => {
    await session?.stop()
  })

  it('drops the stuck pass and stale frames, answers aborted, heartbeats when idle, and runs a new plan on the same stream', async () => {
    const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
    const { plan, tensors } = shardOne(model)
    const { dim, nLayers } = plan.model
    const load = async (): Promise<void> => {
      await session.channel.send({ type: 'plan', plan, shardIndex: 1, threads: 1, heartbeatMs: 50 })
      for (const t of tensors) await session.channel.send(t.header, t.body)
      await session.channel.send({ type: 'load-done', tensors: tensors.length })
      expect((await session.next()).header.type).toBe('ready')
    }
    const random = seededRandom(3)
    const hidden = (seq: number): Float32Array => Float32Array.from({ length: seq * dim }, () => random() - 0.5) // [seq, dim] f32

    await load()
    // Pass 0 of 2 positions: the worker sends its first partial, then waits for a sum that never comes.
    await session.channel.send({ type: 'forward', step: 0, pos0: 0, seq: 2 }, hidden(2))
    const stuck = await session.next()
    expect(stuck.header).toMatchObject({ type: 'ar', tag: allreduceTag(0, nLayers, 0, 0) })
    await session.channel.send({ type: 'abort', epoch: 1, step: 1 })
    expect((await session.next()).header).toEqual({ type: 'aborted', epoch: 1 })

    // Frames of the aborted pass arriving late are ignored: no error, no reply.
    await session.channel.send({ type: 'ar', tag: allreduceTag(0, nLayers, 0, 0) }, hidden(2))
    await session.channel.send({ type: 'forward', step: 0, pos0: 0, seq: 2 }, hidden(2))
    // Idle (no shard loaded now) for 4 heartbeat intervals: heartbeats only, then the stats reply.
    const before = session.pings
    await new Promise((r) => setTimeout(r, 200))
    await session.channel.send({ type: 'stats' })
    const stats = await session.next()
    expect(stats.header.type).toBe('stats')
    expect(stats.header.forwards).toBe(0)
    expect(session.pings).toBeGreaterThan(before)

    // A new plan and shard on the same stream; pass 1 from position 0 completes with the master answering each round.
    await load()
    await session.channel.send({ type: 'forward', step: 1, pos0: 0, seq: 3 }, hidden(3))
    for (let layer = 0; layer < nLayers; layer++) {
      for (const phase of [0, 1] as const) {
        const partial = await session.next()
        expect(partial.header).toMatchObject({ type: 'ar', tag: allreduceTag(1, nLayers, layer, phase) })
        expect(partial.body.byteLength).toBe(3 * dim * 4)
        await session.channel.send({ type: 'ar', tag: partial.header.tag }, partial.body.slice())
      }
    }
    await session.channel.send({ type: 'stats' })
    const after = await session.next()
    expect(after.header.type).toBe('stats')
    expect(after.header.forwards).toBe(1)
    expect(session.ended).toEqual([]) // the session never failed
  }, 30_000)
})
