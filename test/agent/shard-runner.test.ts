import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { ShardRunner } from '../../agent/shard-runner.ts'
import {
  layerGroupSizes,
  ModelWeights,
} from '../../splitter/index.ts'
import {
  loadModel,
  type ModelDescription,
  planTensorParallel,
  readTensorF32,
  sliceLayerShard,
} from '../../splitter/index.ts'
import { createInProcessAllreduce } from '../../transport/index.ts'
import { HAVE_MODELS, MODELS_DIR, referenceCases } from '../support/cli.ts'

// Compute without a network: N shard runners in one process joined by the in-process allreduce. The hidden state
// after all layers must not depend on how the model is split.
async function hiddenStates(
  model: ModelDescription,
  peers: number,
  tokens: readonly number[],
  layers = { start: 0, count: model.config.nLayers },
  input?: Float32Array,
): Promise<Float32Array> {
  const plan = planTensorParallel(model.config, peers, { layers })
  const src = new ModelWeights(model)
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

describe('layerGroupSizes', () => {
  const tinyllama = Array.from({ length: 22 }, () => 27e6) // bytes per layer of TinyLlama-1.1B Q4_0, about
  it('makes as few groups as the limits allow, of near-equal sizes', () => {
    expect(layerGroupSizes(tinyllama, Number.POSITIVE_INFINITY, 2 ** 30)).toEqual([22])
    expect(layerGroupSizes(tinyllama, 8, 2 ** 30)).toEqual([8, 8, 6])
    expect(layerGroupSizes(tinyllama, Number.POSITIVE_INFINITY, 512 * 2 ** 20)).toEqual([11, 11])
    expect(layerGroupSizes(tinyllama, 1, 2 ** 30)).toEqual(Array.from({ length: 22 }, () => 1))
    expect(layerGroupSizes([5], Number.POSITIVE_INFINITY, 2 ** 30)).toEqual([1])
  })
  it('gives a layer over the bytes limit a group of its own', () => {
    expect(layerGroupSizes([100, 300, 100], Number.POSITIVE_INFINITY, 200)).toEqual([1, 1, 1])
    expect(layerGroupSizes([50, 50, 300, 50], Number.POSITIVE_INFINITY, 200)).toEqual([2, 1, 1])
  })
})

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

  it('runs whole layers per graph alone (1 and 3 layers per graph, and a stage of layers 1..4) as the per-block graphs do, within 1e-5', async () => {
    const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
    const src = new ModelWeights(model)
    const tokens = referenceCases()[0]!.prompt_tokens
    const embedding = readTensorF32(model, 'token_embd.weight')
    const { dim } = model.config
    for (const layers of [{ start: 0, count: 5 }, { start: 1, count: 4 }]) {
      const plan = planTensorParallel(model.config, 1, { layers })
      const weights = Array.from({ length: plan.model.nLayers }, (_, layer) => sliceLayerShard(plan.model, plan.shards[0]!, layer, src))
      const states: Float32Array[] = []
      for (const layersPerGraph of [0, 1, 3]) {
        const runner = await ShardRunner.create(plan, 0, weights, { layersPerGraph })
        const [ar] = createInProcessAllreduce(1)
        // The prompt, then two decode steps through the KV cache.
        const out: number[] = []
        let pos0 = 0
        for (const chunk of [tokens, [tokens[1]!], [tokens[2]!]]) {
          const x = new Float32Array(chunk.length * dim)
          for (const [i, t] of chunk.entries()) x.set(embedding.subarray(t * dim, (t + 1) * dim), i * dim)
          out.push(...(await runner.forward(x, pos0, pos0, ar!)))
          pos0 += chunk.length
        }
        expect(runner.cachedLength).toBe(tokens.length + 2)
        await runner.release()
        states.push(Float32Array.from(out))
      }
      for (const whole of states.slice(1)) {
        let maxAbs = 0
        for (let i = 0; i < whole.length; i++) maxAbs = Math.max(maxAbs, Math.abs(whole[i]! - states[0]![i]!))
        expect(maxAbs).toBeLessThan(1e-5)
      }
    }
  })

  it('refuses a forward that does not continue the KV cache', async () => {
    const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
    const plan = planTensorParallel(model.config, 1)
    const src = new ModelWeights(model)
    const runner = await ShardRunner.create(plan, 0, Array.from({ length: 5 }, (_, l) => sliceLayerShard(plan.model, plan.shards[0]!, l, src)))
    const [ar] = createInProcessAllreduce(1)
    await expect(runner.forward(new Float32Array(64), 3, 0, ar!)).rejects.toThrow(/position 3: the KV cache holds 0/)
    await runner.release()
  })
})
