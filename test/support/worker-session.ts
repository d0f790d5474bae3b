import { encodeLayerShard } from '../../agent/shard-encoding.ts'
import { WorkerAgent } from '../../agent/worker.ts'
import { type ModelDescription, ModelWeights, sliceLayerShard, type TensorParallelPlan } from '../../splitter/index.ts'
import { type Frame, type FramedChannel, TENSOR_PARALLEL_PROTOCOL, TransportNode } from '../../transport/index.ts'

/** A real worker agent on 127.0.0.1 and the test as its master over one tensor-parallel stream. */
export interface WorkerSession {
  readonly worker: WorkerAgent
  readonly channel: FramedChannel
  /** How each session the worker ended did (undefined: cleanly). */
  readonly ended: (Error | undefined)[]
  /** Heartbeats skipped by {@link next} so far. */
  readonly pings: number
  /** The next frame that is not a heartbeat (waits at most 10 s). */
  next(): Promise<Frame>
  stop(): Promise<void>
}

/** Starts a worker agent and dials it as a master. */
export async function startWorkerSession(): Promise<WorkerSession> {
  const ended: (Error | undefined)[] = []
  const worker = new WorkerAgent({ listen: ['/ip4/127.0.0.1/tcp/0'], onSessionEnd: (_peer, error) => ended.push(error) })
  await worker.start()
  const master = new TransportNode({ listen: [] })
  await master.start()
  const channel = await master.dial(worker.multiaddrs()[0]!, TENSOR_PARALLEL_PROTOCOL, { fresh: true })
  let pings = 0
  return {
    worker,
    channel,
    ended,
    get pings() {
      return pings
    },
    async next() {
      for (;;) {
        const frame = await channel.read({ signal: AbortSignal.timeout(10_000) })
        if (frame === null) throw new Error('the worker closed the stream')
        if (frame.header.type !== 'ping') return frame
        pings++
      }
    },
    async stop() {
      await channel.close().catch(() => {})
      await master.stop()
      await worker.stop()
    },
  }
}

/** A `tensor` frame of a shard load: header and body. */
export interface TensorFrame {
  readonly header: Record<string, unknown> & { type: 'tensor' }
  readonly body: Uint8Array
}

/**
 * Shard `shardIndex` of `plan` cut out of `model`, as the master sends it after the `plan` frame: one `tensor` frame per
 * tensor, layer by layer (bodies copied, so they outlive the slicer's buffers).
 */
export function shardTensorFrames(model: ModelDescription, plan: TensorParallelPlan, shardIndex: number): TensorFrame[] {
  const source = new ModelWeights(model)
  const frames: TensorFrame[] = []
  for (let layer = plan.layers.start; layer < plan.layers.start + plan.layers.count; layer++) {
    for (const t of encodeLayerShard(sliceLayerShard(plan.model, plan.shards[shardIndex]!, layer, source))) {
      frames.push({ header: { type: 'tensor', layer, name: t.name, bits: t.bits, rows: t.rows, cols: t.cols }, body: t.body.slice() })
    }
  }
  return frames
}
