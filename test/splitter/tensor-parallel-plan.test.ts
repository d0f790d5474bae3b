import { describe, expect, it } from 'vitest'
import type { LlamaConfig } from '../../splitter/index.ts'
import { planTensorParallel, proportionalShares } from '../../splitter/index.ts'

// stories260K's shape: 8 query heads over 4 KV heads (GQA), FFN width 172.
const config: LlamaConfig = {
  arch: 'llama',
  dim: 64,
  hiddenDim: 172,
  nLayers: 5,
  nHeads: 8,
  nKvHeads: 4,
  headDim: 8,
  vocabSize: 512,
  maxSeqLen: 512,
  normEps: 1e-5,
  ropeTheta: 10000,
  ropeStyle: 'adjacent',
}

describe('proportionalShares', () => {
  it('deals by largest remainder, ties to the lower index', () => {
    expect(proportionalShares(4, [1, 1, 1])).toEqual([2, 1, 1])
    expect(proportionalShares(172, [1, 1, 1])).toEqual([58, 57, 57])
    expect(proportionalShares(10, [3, 1])).toEqual([8, 2])
    expect(proportionalShares(4, [1, 1, 1, 1, 1])).toEqual([1, 1, 1, 1, 0])
  })
})

describe('planTensorParallel', () => {
  it('gives 3 peers whole KV heads with their query heads and uneven FFN shares', () => {
    const plan = planTensorParallel(config, 3)
    expect(plan.shards.map((s) => [s.kvHeads, s.heads, s.ffnColumns])).toEqual([
      [{ start: 0, count: 2 }, { start: 0, count: 4 }, { start: 0, count: 58 }],
      [{ start: 2, count: 1 }, { start: 4, count: 2 }, { start: 58, count: 57 }],
      [{ start: 3, count: 1 }, { start: 6, count: 2 }, { start: 115, count: 57 }],
    ])
    expect(plan.syncPoints).toEqual(['attention', 'ffn'])
    expect(JSON.parse(JSON.stringify(plan))).toEqual(plan)
  })

  it('covers every head and column exactly once for 1..8 peers', () => {
    for (let n = 1; n <= 8; n++) {
      const plan = planTensorParallel(config, n)
      expect(plan.shards.reduce((a, s) => a + s.kvHeads.count, 0)).toBe(4)
      expect(plan.shards.reduce((a, s) => a + s.heads.count, 0)).toBe(8)
      expect(plan.shards.reduce((a, s) => a + s.ffnColumns.count, 0)).toBe(172)
      for (const [i, s] of plan.shards.entries()) {
        if (i > 0) {
          const p = plan.shards[i - 1]!
          expect(s.kvHeads.start).toBe(p.kvHeads.start + p.kvHeads.count)
          expect(s.ffnColumns.start).toBe(p.ffnColumns.start + p.ffnColumns.count)
        }
      }
    }
  })

  it('lets peers beyond the KV heads work on the FFN only', () => {
    const plan = planTensorParallel(config, 5)
    expect(plan.shards.map((s) => s.kvHeads.count)).toEqual([1, 1, 1, 1, 0])
    expect(plan.shards.map((s) => s.ffnColumns.count)).toEqual([35, 35, 34, 34, 34])
  })

  it('follows device weights', () => {
    const plan = planTensorParallel(config, 2, { weights: [3, 1] })
    expect(plan.shards.map((s) => s.kvHeads.count)).toEqual([3, 1])
    expect(plan.shards.map((s) => s.ffnColumns.count)).toEqual([129, 43])
  })

  it('refuses impossible plans with a RangeError naming the numbers', () => {
    expect(() => planTensorParallel(config, 0)).toThrow(expect.objectContaining({ name: 'RangeError' }))
    expect(() => planTensorParallel(config, 173)).toThrow(/FFN width 172 .* over 173 peers: at most 172/)
    expect(() => planTensorParallel(config, 2, { ffnBlock: 32 })).toThrow(/FFN width 172 in blocks of 32/)
    expect(() => planTensorParallel({ ...config, nKvHeads: 3 }, 2)).toThrow(/8 query heads do not group evenly over 3 KV heads/)
    expect(() => planTensorParallel(config, 2, { weights: [1] })).toThrow(/need 2 finite values/)
  })
})
