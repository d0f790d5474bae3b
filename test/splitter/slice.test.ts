import { describe, expect, it } from 'vitest'
import type { LinearWeight, LlamaConfig, WeightSource } from '../../splitter/index.ts'
import { planTensorParallel, sliceColumns, sliceLayerShard, sliceRows } from '../../splitter/index.ts'

describe('sliceRows / sliceColumns', () => {
  const m = Float32Array.from({ length: 12 }, (_, i) => i) // [3, 4]
  it('takes row and column ranges', () => {
    expect([...sliceRows(m, 4, 1, 2)]).toEqual([4, 5, 6, 7, 8, 9, 10, 11])
    expect(sliceRows(m, 4, 1, 2).buffer).toBe(m.buffer)
    expect([...sliceColumns(m, 4, 1, 2)]).toEqual([1, 2, 5, 6, 9, 10])
  })
  it('refuses ranges outside the matrix', () => {
    expect(() => sliceRows(m, 4, 2, 2)).toThrow(/rows 2..4 of a 3×4 matrix/)
    expect(() => sliceColumns(m, 4, 3, 2)).toThrow(RangeError)
  })
})

describe('sliceLayerShard', () => {
  const config: LlamaConfig = {
    arch: 'llama', dim: 4, hiddenDim: 6, nLayers: 1, nHeads: 4, nKvHeads: 2, headDim: 1,
    vocabSize: 8, maxSeqLen: 8, normEps: 1e-5, ropeTheta: 10000, ropeStyle: 'adjacent',
  }
  const sizes: Record<string, number> = {
    'attn_norm.weight': 4, 'attn_q.weight': 16, 'attn_k.weight': 8, 'attn_v.weight': 8, 'attn_output.weight': 16,
    'ffn_norm.weight': 4, 'ffn_gate.weight': 24, 'ffn_up.weight': 24, 'ffn_down.weight': 24,
  }
  const shapes: Record<string, [number, number]> = {
    'attn_q.weight': [4, 4], 'attn_k.weight': [2, 4], 'attn_v.weight': [2, 4], 'attn_output.weight': [4, 4],
    'ffn_gate.weight': [6, 4], 'ffn_up.weight': [6, 4], 'ffn_down.weight': [4, 6],
  }
  const iota = (name: string): Float32Array => Float32Array.from({ length: sizes[name.slice('blk.0.'.length)]! }, (_, i) => i)
  const source: WeightSource = {
    vector: iota,
    linear: (name) => {
      const [rows, cols] = shapes[name.slice('blk.0.'.length)]!
      return { bits: 32, rows, cols, data: iota(name) }
    },
  }
  const values = (w: LinearWeight): number[] => (w.bits === 32 ? [...w.data] : [])

  it('cuts Q/K/V by head rows, Wo by the matching columns, W1/W3 by rows and W2 by columns', () => {
    const plan = planTensorParallel(config, 2)
    const w = sliceLayerShard(plan.model, plan.shards[1]!, 0, source)
    expect(values(w.attention!.wq)).toEqual([8, 9, 10, 11, 12, 13, 14, 15]) // query heads 2,3 = rows 2,3 of [4,4]
    expect(values(w.attention!.wk)).toEqual([4, 5, 6, 7]) // KV head 1 = row 1 of [2,4]
    expect(values(w.attention!.wo)).toEqual([2, 3, 6, 7, 10, 11, 14, 15]) // columns 2,3 of [4,4]
    expect(w.attention!.wo).toMatchObject({ rows: 4, cols: 2 })
    expect(values(w.ffn!.w1)).toEqual([12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]) // rows 3..5 of [6,4]
    expect(values(w.ffn!.w2)).toEqual([3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23]) // columns 3..5 of [4,6]
  })

  it('reads through a source\'s ranged reads when it has them, with the same result', () => {
    const plan = planTensorParallel(config, 2)
    const asked: string[] = []
    const ranged: WeightSource = {
      ...source,
      linear: () => {
        throw new Error('the full tensor is not needed')
      },
      linearRows: (name, start, count) => {
        asked.push(`${name} rows ${start}+${count}`)
        const full = source.linear(name)
        return { bits: 32, rows: count, cols: full.cols, data: sliceRows((full as { data: Float32Array }).data, full.cols, start, count) }
      },
      linearColumns: (name, start, count) => {
        asked.push(`${name} columns ${start}+${count}`)
        const full = source.linear(name)
        return { bits: 32, rows: full.rows, cols: count, data: sliceColumns((full as { data: Float32Array }).data, full.cols, start, count) }
      },
    }
    expect(sliceLayerShard(plan.model, plan.shards[1]!, 0, ranged)).toEqual(sliceLayerShard(plan.model, plan.shards[1]!, 0, source))
    expect(asked).toContain('blk.0.ffn_down.weight columns 3+3')
    const wrong: WeightSource = { ...ranged, linearRows: (name) => source.linear(name) }
    expect(() => sliceLayerShard(plan.model, plan.shards[1]!, 0, wrong)).toThrow(/rows 2\.\.4 came as 4×4, expected 2×4/)
  })

  it('refuses a tensor of the wrong size', () => {
    const plan = planTensorParallel(config, 1)
    const bad: WeightSource = { vector: () => new Float32Array(3), linear: source.linear }
    expect(() => sliceLayerShard(plan.model, plan.shards[0]!, 0, bad)).toThrow(/blk.0.attn_norm.weight: 3 values, expected 4/)
  })
})
