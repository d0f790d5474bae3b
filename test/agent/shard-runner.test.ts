import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { ShardRunner } from '../../agent/shard-runner.ts'
import {
  loadModel,
  type ModelDescription,
  planTensorParallel,
  readTensorBytes,
  readTensorF32,
  sliceLayerShard,
  toLinearWeight,
  type WeightSource,
} from '../../splitter/index.ts'
import { createInProcessAllreduce } from '../../transport/index.ts'
import { HAVE_MODELS, MODELS_DIR, referenceCases } from '../support/cli.ts'

// Compute without a network: N shard runners in one process joined by the in-process allreduce. The hidden state
// after all layers must not depend on how the model is split.
function source(model: ModelDescription): WeightSource {
  return {
    vector: (name) => readTensorF32(model, name),
    linear: (name) => {
      const ref = model.tensors.get(name)!
      return toLinearWeight(ref.dtype, readTensorBytes(model, name), ref.shape[0]!, ref.shape[1]!)
    },
  }
}

async function hiddenStates(
  model: ModelDescription,
  peers: number,
  tokens: readonly number[],
  layers = { start: 0, count: model.config.nLayers },
  input?: Float32Array,
): Promise<Float32Array> {
  const plan = planTensorParallel(model.config, peers, { layers })
  const src = source(model)
  const runners = await Promise.all(
    plan.shards.map((shard) =>
      ShardRunner.create(
        plan,
        shard.index,
        Array.from({ length: plan.model.nLayers }, (_, layer) => sliceLayerShard(plan.model, shard, layer, src)),
      ),
    ),
  )
  const allreduce = createInProcessAllreduce(peers)
  const { dim } = model.config
  const embedding = readTensorF32(model, 'token_embd.weight')
  const x = input ?? new Float32Array(tokens.length * dim)
  if (!input) for (const [i, t] of tokens.entries()) x.set(embedding.subarray(t * dim, (t + 1) * dim), i * dim)
  const outs = await Promise.all(runners.map((r, i) => r.forward(x.slice(), 0, 0, allreduce[i]!)))
  for (const out of outs.slice(1)) expect(out).toEqual(outs[0]) // every peer ends with the same hidden state
  await Promise.all(runners.map((r) => r.release()))
  return outs[0]!
}

describe.skipIf(!HAVE_MODELS)('ShardRunner with the in-process allreduce', () => {
  it('gives the same hidden states for 1..5 peers within 1e-4 (stories260K, a reference prompt)', async () => {
    const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
    const tokens = referenceCases()[2]!.prompt_tokens
    const single = await hiddenStates(model, 1, tokens)
    for (const peers of [2, 3, 4, 5]) {
      const split = await hiddenStates(model, peers, tokens)
      let maxAbs = 0
      for (let i = 0; i < single.length; i++) maxAbs = Math.max(maxAbs, Math.abs(single[i]! - split[i]!))
      expect(maxAbs).toBeLessThan(1e-4)
    }
  })

  it('runs a layer range per stage: stages chained (pipeline and hybrid shapes) match the whole model within 1e-4', async () => {
    const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
    const tokens = referenceCases()[1]!.prompt_tokens
    const single = await hiddenStates(model, 1, tokens)
    // Pipeline: 1 peer per stage over layers 0–1 and 2–4; hybrid: 2 tensor-parallel peers, then 3.
    for (const peers of [[1, 1], [2, 3]] as const) {
      const first = await hiddenStates(model, peers[0], tokens, { start: 0, count: 2 })
      const second = await hiddenStates(model, peers[1], tokens, { start: 2, count: 3 }, first)
      let maxAbs = 0
      for (let i = 0; i < single.length; i++) maxAbs = Math.max(maxAbs, Math.abs(single[i]! - second[i]!))
      expect(maxAbs).toBeLessThan(1e-4)
      expect(second).not.toEqual(first)
    }
  })

  it('refuses a forward that does not continue the KV cache', async () => {
    const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
    const plan = planTensorParallel(model.config, 1)
    const src = source(model)
    const runner = await ShardRunner.create(plan, 0, Array.from({ length: 5 }, (_, l) => sliceLayerShard(plan.model, plan.shards[0]!, l, src)))
    const [ar] = createInProcessAllreduce(1)
    await expect(runner.forward(new Float32Array(64), 3, 0, ar!)).rejects.toThrow(/position 3: the KV cache holds 0/)
    await runner.release()
  })
})
