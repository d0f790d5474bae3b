import { describe, expect, it } from 'vitest'
import { blockFlopsPerPosition, SLOW_DEVICE_FLOPS_PER_MS, stepDeadlineMs } from '../../agent/peer-deadline.ts'

/** stories260K and TinyLlama-1.1B shapes (dim, FFN width, heads, KV heads, head size). */
const STORIES = { dim: 64, hiddenDim: 172, nHeads: 8, nKvHeads: 4, headDim: 8 }
const TINYLLAMA = { dim: 2048, hiddenDim: 5632, nHeads: 32, nKvHeads: 4, headDim: 64 }

describe('peer deadline of a pass', () => {
  it('is the base for one decode step of a small model, and grows by one slow block per position', () => {
    expect(blockFlopsPerPosition(STORIES, 1)).toBe(6 * 64 * 172) // the FFN: 66 048 FLOPs
    expect(stepDeadlineMs(2000, STORIES, 1)).toBeCloseTo(2000 + 66_048 / SLOW_DEVICE_FLOPS_PER_MS, 9)
    // TinyLlama: the FFN (69.2 MFLOP per position) dominates; a 128-token prompt adds 8.9 s at 1 GFLOP/s.
    expect(blockFlopsPerPosition(TINYLLAMA, 128)).toBe(6 * 2048 * 5632)
    expect(stepDeadlineMs(2000, TINYLLAMA, 128)).toBeCloseTo(2000 + (128 * 6 * 2048 * 5632) / 1e6, 6)
  })

  it('counts attention over a long context when it outweighs the FFN', () => {
    const q = 32 * 64
    const attention = (ctx: number): number => 2 * 2048 * (q + 2 * 256) + 2 * q * 2048 + 4 * q * ctx
    expect(blockFlopsPerPosition(TINYLLAMA, 8192)).toBe(attention(8192))
    expect(attention(8192)).toBeGreaterThan(6 * 2048 * 5632)
  })

  it('refuses a base that is not a positive number of ms, or an empty pass', () => {
    expect(() => stepDeadlineMs(0, STORIES, 1)).toThrow(RangeError)
    expect(() => stepDeadlineMs(Number.NaN, STORIES, 1)).toThrow(RangeError)
    expect(() => stepDeadlineMs(1000, STORIES, 0)).toThrow(/0 positions/)
  })
})
