/**
 * The memory check made before a cluster starts must count what the runtime stores: shard-file blocks (tensors 8-byte
 * aligned, Q4_0 as MatMulNBits blob + scales, qwen2 biases) and the KV cache. Checked against shard files written
 * from real slices of a synthetic Q4_0 qwen2 model, then the refusals themselves.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { checkPlanFits, shareNeeds } from '../../agent/plan-fit.ts'
import { encodeLayerShard, kvCacheBytes } from '../../agent/shard-encoding.ts'
import { ShardFileWriter, streamingNeeds } from '../../agent/weight-store.ts'
import {
  buildClusterPlan,
  loadModel,
  type ModelDescription,
  ModelWeights,
  parseStageLayout,
  sliceLayerShard,
} from '../../splitter/index.ts'
import { runCli } from '../support/cli.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-plan-fit-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

let model: ModelDescription

beforeAll(async () => {
  const path = join(dir, 'qwen2-q4.gguf')
  const r = await runCli(['synth', '--shape', 'test-qwen2', '--type', 'q4_0', '--seed', '5', '--out', path, '--quiet'], { timeoutMs: 60_000 })
  expect(r.code).toBe(0)
  model = loadModel(path)
}, 60_000)

describe('shareNeeds', () => {
  it('counts the blocks and KV cache of real shard files (Q4_0, biases, uneven shares)', async () => {
    expect(model.config.qkvBias).toBe(true)
    expect(model.tensors.get('blk.0.ffn_down.weight')!.dtype).toBe('q4_0')
    // Device 1 alone on layer 0, devices 0 and 2 sharing layer 1 (FFN columns in 32-column blocks).
    const plan = buildClusterPlan(model.config, parseStageLayout('1:1,0+2:1'), 3, { attentionBlock: 32, ffnBlock: 32 })
    const weights = new ModelWeights(model)
    for (const stage of plan.stages) {
      for (const shard of stage.tensorParallel.shards) {
        const writer = await ShardFileWriter.create(join(dir, `shard-${stage.layers.start}-${shard.index}`))
        for (let layer = stage.layers.start; layer < stage.layers.start + stage.layers.count; layer++) {
          for (const t of encodeLayerShard(sliceLayerShard(stage.tensorParallel.model, shard, layer, weights))) {
            await writer.add(layer, t.name, t.bits, t.rows, t.cols, t.body)
          }
        }
        await writer.finish()
        const index = JSON.parse(readFileSync(join(writer.dir, 'index.json'), 'utf8')) as { blocks: { bytes: number }[] }
        const needs = shareNeeds(model, stage.tensorParallel, shard)
        expect(needs.weightBytes).toBe(index.blocks.reduce((s, b) => s + b.bytes, 0))
        expect(needs.largestBlockBytes).toBe(Math.max(...index.blocks.map((b) => b.bytes)))
        expect(needs.kvCacheBytes).toBe(kvCacheBytes(stage.tensorParallel, shard.index))
        expect(needs.ropeBytes).toBe(2 * model.config.maxSeqLen * model.config.headDim * 4)
      }
    }
  })
})

describe('streamingNeeds', () => {
  it('charges 2 streamed blocks, the KV cache and the kernels\' workspace', () => {
    const f32 = [{ bits: 32 as const, rows: 1, cols: 64 }, { bits: 32 as const, rows: 96, cols: 64 }]
    expect(streamingNeeds([f32], 1000, 'int8')).toEqual({ largestBlockBytes: 256 + 96 * 64 * 4, workspaceBytes: 0, kvCacheBytes: 1000, neededBytes: 2 * (256 + 96 * 64 * 4) + 1000, quantized: false })
    // A 96×64 Q4_0 weight streams blockwise: one byte per weight plus an f32 scale per 32 (6144 + 768).
    const q4 = [{ bits: 32 as const, rows: 1, cols: 64 }, { bits: 4 as const, rows: 96, cols: 64 }]
    expect(streamingNeeds([q4], 1000, 'int8')).toMatchObject({ largestBlockBytes: 256 + 6912, workspaceBytes: 4 * 4 * 2 ** 20, quantized: true })
    expect(streamingNeeds([q4], 1000, 'exact').workspaceBytes).toBe(16 * 96 * 64)
  })
})

describe('checkPlanFits', () => {
  it('lets a share run resident or streamed, whichever fits; refuses less, naming the device and the bytes', () => {
    const plan = buildClusterPlan(model.config, parseStageLayout('0+1:2'), 2, { attentionBlock: 32, ffnBlock: 32 })
    const tp = plan.stages[0]!.tensorParallel
    // The master's share (no RoPE rule on the master, whose budget covers its share alone).
    const master = shareNeeds(model, tp, tp.shards[0]!)
    const resident = master.weightBytes + master.kvCacheBytes
    const streaming = streamingNeeds(master.blocks, master.kvCacheBytes, tp.quantizedMatmul)
    // This model is so small that streaming, with its kernels' workspace, needs more than holding it all.
    expect(streaming.neededBytes).toBe(192_000)
    expect(resident).toBe(122_880)
    const devices = (masterBudget: number | undefined, workerBudget?: number) => [
      { name: 'm', budgetBytes: masterBudget },
      { name: 'w', budgetBytes: workerBudget },
    ]
    expect(() => checkPlanFits(model, plan, devices(resident))).not.toThrow()
    expect(() => checkPlanFits(model, plan, devices(undefined))).not.toThrow()
    let refused: (Error & { neededBytes?: number }) | undefined
    try {
      checkPlanFits(model, plan, devices(resident - 1), 'plan file p.json: ')
    } catch (err) {
      refused = err as Error
    }
    expect(refused?.name).toBe('MemoryBudgetError')
    expect(refused?.neededBytes).toBe(streaming.neededBytes)
    expect(refused?.message).toBe(
      `plan file p.json: memory budget of ${resident - 1} bytes on m (device 0) is too small: needs 192000 ` +
        `(2 blocks of 14080 as streamed, one byte per quantized weight + KV cache 98304 at 256 positions + kernel workspace 65536)`,
    )
    // A worker keeps its RoPE tables under a quarter of its budget.
    const worker = shareNeeds(model, tp, tp.shards[1]!)
    expect(() => checkPlanFits(model, plan, devices(undefined, 4 * worker.ropeBytes))).not.toThrow()
    expect(() => checkPlanFits(model, plan, devices(undefined, 4 * worker.ropeBytes - 1))).toThrow(
      `memory budget of ${4 * worker.ropeBytes - 1} bytes on w (device 1) is too small: its RoPE tables for a context of 256 × head size 16 ` +
        `need ${worker.ropeBytes} bytes, at most a quarter of the budget: needs ${4 * worker.ropeBytes}`,
    )
  })
})
