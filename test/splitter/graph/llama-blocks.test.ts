import { describe, expect, it } from 'vitest'
import { type HostTensor, Session } from '../../../agent/runtime.ts'
import { asConstants, causalMask, linearFeeds } from '../../../agent/shard-runner.ts'
import {
  type AttentionKernel,
  type AttentionShardShape,
  buildAttentionBlock,
  buildDecoderLayers,
  buildFfnBlock,
  type FfnShardShape,
  type LinearWeight,
  quantizeQ4_0,
  ropeCaches,
  ropeTables,
  toLinearWeight,
} from '../../../splitter/index.ts'
import { seededRandom } from '../../support/random.ts'

// The attention kernels ('gqa': ORT's GroupQueryAttention, 'ops': plain ONNX ops) and the whole-layer graph against
// the per-block graphs, on random weights through real onnxruntime sessions. Prefill, single-token decode and a
// later multi-token chunk all go through the KV cache.

const DIM = 64
const MAX_SEQ = 32
const THETA = 10000
const SEQS = [5, 1, 1, 3, 1] // positions 0-4, 5, 6, 7-9, 10

function uniform(seed: number): (n: number, scale?: number) => Float32Array {
  const random = seededRandom(seed)
  return (n, scale = 0.3) => Float32Array.from({ length: n }, () => (random() - 0.5) * 2 * scale)
}

function linearWeight(rand: ReturnType<typeof uniform>, rows: number, cols: number, bits: 32 | 4): LinearWeight {
  const values = rand(rows * cols)
  return bits === 32 ? { bits: 32, rows, cols, data: values } : toLinearWeight('q4_0', quantizeQ4_0(values), rows, cols)
}

function attentionFeeds(shape: AttentionShardShape, seed: number, bits: 32 | 4): Record<string, HostTensor> {
  const rand = uniform(seed)
  const q = shape.heads * shape.headDim
  const kv = shape.kvHeads * shape.headDim
  const vec = (n: number, base = 0): HostTensor => ({ data: rand(n).map((v) => base + v), dims: [n] })
  return {
    attn_norm: vec(DIM, 1),
    ...linearFeeds('wq', linearWeight(rand, q, DIM, bits)),
    ...linearFeeds('wk', linearWeight(rand, kv, DIM, bits)),
    ...linearFeeds('wv', linearWeight(rand, kv, DIM, bits)),
    ...linearFeeds('wo', linearWeight(rand, DIM, q, bits)),
    ...(shape.qkvBias ? { bq: vec(q), bk: vec(kv), bv: vec(kv) } : {}),
  }
}

function ffnFeeds(shape: FfnShardShape, seed: number, bits: 32 | 4): Record<string, HostTensor> {
  const rand = uniform(seed)
  return {
    ffn_norm: { data: rand(DIM).map((v) => 1 + v), dims: [DIM] },
    ...linearFeeds('w1', linearWeight(rand, shape.columns, DIM, bits)),
    ...linearFeeds('w3', linearWeight(rand, shape.columns, DIM, bits)),
    ...linearFeeds('w2', linearWeight(rand, DIM, shape.columns, bits)),
  }
}

/** Inputs giving positions pos0..pos0+seq-1 to a graph of `kernel` (see buildAttentionBlock). */
function positionFeeds(kernel: AttentionKernel, shape: AttentionShardShape, pos0: number, seq: number): Record<string, HostTensor> {
  const hd = shape.headDim
  const total = pos0 + seq
  if (kernel === 'gqa') {
    const { cos, sin } = ropeCaches(MAX_SEQ, hd, THETA)
    return {
      seqlens_k: { data: Int32Array.of(total - 1), dims: [1] },
      total_sequence_length: { data: Int32Array.of(total), dims: [] },
      cos_cache: { data: cos, dims: [MAX_SEQ, hd / 2] },
      sin_cache: { data: sin, dims: [MAX_SEQ, hd / 2] },
    }
  }
  const { cos, sin } = ropeTables(MAX_SEQ, hd, THETA, shape.ropeStyle)
  return {
    cos: { data: cos.subarray(pos0 * hd, total * hd), dims: [seq, hd] },
    sin: { data: sin.subarray(pos0 * hd, total * hd), dims: [seq, hd] },
    mask: { data: causalMask(seq, pos0), dims: [seq, total] },
  }
}

/**
 * A 'gqa' KV cache as the runner keeps it: [1, kvHeads, capacity, headDim] f32 with positions 0..length-1 of each
 * head first; the graphs read it and return only each step's rows.
 */
class KvBuffer {
  readonly kvHeads: number
  readonly headDim: number
  data = new Float32Array(0)
  capacity = 0
  length = 0

  constructor(kvHeads: number, headDim: number) {
    this.kvHeads = kvHeads
    this.headDim = headDim
  }

  /** Re-lays the buffer out with room for exactly `capacity` positions (≥ length). */
  resize(capacity: number): void {
    const next = new Float32Array(this.kvHeads * capacity * this.headDim)
    for (let h = 0; h < this.kvHeads; h++) {
      next.set(this.data.subarray(h * this.capacity * this.headDim, (h * this.capacity + this.length) * this.headDim), h * capacity * this.headDim)
    }
    this.data = next
    this.capacity = capacity
  }

  /** Appends rows [1, kvHeads, seq, headDim]. */
  append(rows: Float32Array, seq: number): void {
    const n = seq * this.headDim
    for (let h = 0; h < this.kvHeads; h++) this.data.set(rows.subarray(h * n, (h + 1) * n), (h * this.capacity + this.length) * this.headDim)
    this.length += seq
  }

  /** Positions 0..length-1: [kvHeads, length, headDim]. */
  contents(): Float32Array {
    const out = new Float32Array(this.kvHeads * this.length * this.headDim)
    for (let h = 0; h < this.kvHeads; h++) {
      out.set(this.data.subarray(h * this.capacity * this.headDim, (h * this.capacity + this.length) * this.headDim), h * this.length * this.headDim)
    }
    return out
  }

  /** As a graph's `past_k` / `past_v`. */
  feed(): HostTensor {
    return { data: this.data, dims: [1, this.kvHeads, this.capacity, this.headDim] }
  }
}

/** Capacity of the 'gqa' cache at step `i` of `SEQS`: exactly the positions so far, or room to spare, in turn. */
const capacityAt = (i: number, total: number): number => (i % 2 === 0 ? total : MAX_SEQ)

/**
 * Runs `SEQS` through one attention graph; returns per step the partial [seq, dim] and the KV cache after it
 * ([kvHeads, total, headDim]).
 */
async function attentionSteps(
  shape: AttentionShardShape,
  kernel: AttentionKernel,
  weights: Record<string, HostTensor>,
  baked: boolean,
  xs: readonly Float32Array[],
): Promise<{ partial: Float32Array; k: Float32Array; v: Float32Array }[]> {
  const session = await Session.create('attention', buildAttentionBlock({ ...shape, kernel }, baked ? asConstants(weights) : undefined))
  const cache = { k: new KvBuffer(shape.kvHeads, shape.headDim), v: new KvBuffer(shape.kvHeads, shape.headDim) }
  let k: Float32Array = new Float32Array(0) // 'ops': [kvHeads, past, headDim]
  let v: Float32Array = new Float32Array(0)
  let pos0 = 0
  const out = []
  for (const [i, x] of xs.entries()) {
    const seq = x.length / DIM
    const feeds: Record<string, HostTensor> = { x: { data: x, dims: [seq, DIM] }, ...positionFeeds(kernel, shape, pos0, seq), ...(baked ? {} : weights) }
    if (kernel === 'gqa') {
      for (const c of [cache.k, cache.v]) c.resize(capacityAt(i, pos0 + seq))
      const r = await session.run({ ...feeds, past_k: cache.k.feed(), past_v: cache.v.feed() })
      expect(r.new_k!.dims).toEqual([1, shape.kvHeads, seq, shape.headDim])
      cache.k.append(r.new_k!.data as Float32Array, seq)
      cache.v.append(r.new_v!.data as Float32Array, seq)
      out.push({ partial: r.partial!.data as Float32Array, k: cache.k.contents(), v: cache.v.contents() })
    } else {
      const r = await session.run({ ...feeds, past_k: { data: k, dims: [shape.kvHeads, pos0, shape.headDim] }, past_v: { data: v, dims: [shape.kvHeads, pos0, shape.headDim] } })
      k = r.present_k!.data as Float32Array
      v = r.present_v!.data as Float32Array
      out.push({ partial: r.partial!.data as Float32Array, k, v })
    }
    pos0 += seq
  }
  await session.release()
  return out
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length)
  let d = 0
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!))
  return d
}

const hiddenStates = (seed: number): Float32Array[] => {
  const rand = uniform(seed)
  return SEQS.map((seq) => rand(seq * DIM, 1))
}

describe('attention kernels', () => {
  const cases: { name: string; shape: AttentionShardShape; baked: boolean }[] = [
    { name: 'head size 16 (RoPE inside GroupQueryAttention), adjacent pairs, dense', shape: attentionShape(16, 4, 2, 'adjacent', false), baked: true },
    { name: 'head size 16, halves, Q/K/V biases, 4-bit weights', shape: attentionShape(16, 4, 2, 'halves', true, 4), baked: true },
    { name: 'head size 8 (RotaryEmbedding first), adjacent pairs, dense', shape: attentionShape(8, 8, 4, 'adjacent', false), baked: true },
    { name: 'head size 8, halves, Q/K/V biases, weights as inputs', shape: attentionShape(8, 4, 1, 'halves', true), baked: false },
    { name: 'head size 16, 4-bit weights as inputs (three projections)', shape: attentionShape(16, 4, 4, 'adjacent', false, 4), baked: false },
  ]
  it.each(cases)("'gqa' matches 'ops' within 1e-5 through prefill, decode and a later chunk: $name", async ({ shape, baked }) => {
    const weights = attentionFeeds(shape, 11, shape.bits.wq === 4 ? 4 : 32)
    const xs = hiddenStates(12)
    const gqa = await attentionSteps(shape, 'gqa', weights, baked, xs)
    const ops = await attentionSteps(shape, 'ops', weights, baked, xs)
    for (const [i, step] of gqa.entries()) {
      expect(maxAbsDiff(step.partial, ops[i]!.partial)).toBeLessThan(1e-5)
      expect(maxAbsDiff(step.k, ops[i]!.k)).toBeLessThan(1e-5)
      expect(maxAbsDiff(step.v, ops[i]!.v)).toBe(0) // V is not rotated: copied as computed
    }
    // The cache holds every position so far: [kvHeads, total, headDim].
    expect(gqa.at(-1)!.k.length).toBe(shape.kvHeads * 11 * shape.headDim)
  })

  it("refuses 'gqa' for a head size that is not a multiple of 8", () => {
    expect(() => buildAttentionBlock({ ...attentionShape(4, 2, 1, 'adjacent', false), kernel: 'gqa' })).toThrow(RangeError)
  })
})

describe('buildDecoderLayers', () => {
  it('matches the attention and FFN blocks with host-side residual adds within 1e-5 (2 layers, 4-bit)', async () => {
    const a4 = attentionShape(16, 4, 2, 'adjacent', false, 4)
    const fShape: FfnShardShape = { dim: DIM, columns: 96, normEps: 1e-5, bits: { w1: 4, w3: 4, w2: 4 } }
    const layers = [0, 1].map((l) => ({ attention: attentionFeeds(a4, 20 + l, 4), ffn: ffnFeeds(fShape, 30 + l, 4) }))
    const whole = await Session.create('layers', buildDecoderLayers(a4, fShape, layers.map((l) => asConstants({ ...l.attention, ...l.ffn }))))
    const blocks = await Promise.all(
      layers.map(async (l) => ({
        attention: await Session.create('attention', buildAttentionBlock(a4, asConstants(l.attention))),
        ffn: await Session.create('ffn', buildFfnBlock(fShape, asConstants(l.ffn))),
      })),
    )
    const newCache = (): { k: KvBuffer; v: KvBuffer } => ({ k: new KvBuffer(a4.kvHeads, a4.headDim), v: new KvBuffer(a4.kvHeads, a4.headDim) })
    const cacheW = layers.map(newCache)
    const cacheB = layers.map(newCache)
    let pos0 = 0
    for (const [step, x] of hiddenStates(40).entries()) {
      const seq = x.length / DIM
      for (const c of [...cacheW, ...cacheB]) for (const b of [c.k, c.v]) b.resize(capacityAt(step, pos0 + seq))
      const positions = positionFeeds('gqa', a4, pos0, seq)
      const feeds: Record<string, HostTensor> = { x: { data: x, dims: [seq, DIM] }, ...positions }
      for (const [i, c] of cacheW.entries()) {
        feeds[`past_k_${i}`] = c.k.feed()
        feeds[`past_v_${i}`] = c.v.feed()
      }
      const w = await whole.run(feeds)
      const h = x.slice()
      for (const [i, b] of blocks.entries()) {
        const a = await b.attention.run({ x: { data: h, dims: [seq, DIM] }, ...positions, past_k: cacheB[i]!.k.feed(), past_v: cacheB[i]!.v.feed() })
        cacheB[i]!.k.append(a.new_k!.data as Float32Array, seq)
        cacheB[i]!.v.append(a.new_v!.data as Float32Array, seq)
        const ap = a.partial!.data as Float32Array
        for (let j = 0; j < h.length; j++) h[j]! += ap[j]!
        const f = (await b.ffn.run({ h: { data: h, dims: [seq, DIM] } })).partial!.data as Float32Array
        for (let j = 0; j < h.length; j++) h[j]! += f[j]!
      }
      expect(maxAbsDiff(w.y!.data as Float32Array, h)).toBeLessThan(1e-5)
      for (const [i, c] of cacheW.entries()) {
        c.k.append(w[`new_k_${i}`]!.data as Float32Array, seq)
        c.v.append(w[`new_v_${i}`]!.data as Float32Array, seq)
        expect(maxAbsDiff(c.k.contents(), cacheB[i]!.k.contents())).toBeLessThan(1e-5)
        expect(maxAbsDiff(c.v.contents(), cacheB[i]!.v.contents())).toBeLessThan(1e-5)
      }
      pos0 += seq
    }
    await whole.release()
    for (const b of blocks) {
      await b.attention.release()
      await b.ffn.release()
    }
  })

  it('refuses a layer with a weight missing, naming it', () => {
    const shape = attentionShape(16, 4, 2, 'adjacent', false)
    const fShape: FfnShardShape = { dim: DIM, columns: 32, normEps: 1e-5, bits: { w1: 32, w3: 32, w2: 32 } }
    const { w2: _, ...partial } = ffnFeeds(fShape, 1, 32)
    expect(() => buildDecoderLayers(shape, fShape, [asConstants({ ...attentionFeeds(shape, 1, 32), ...partial })])).toThrow(/layer 0 lacks weights w2/)
  })
})

function attentionShape(headDim: number, heads: number, kvHeads: number, ropeStyle: 'adjacent' | 'halves', qkvBias: boolean, bits: 32 | 4 = 32): AttentionShardShape {
  return { dim: DIM, headDim, heads, kvHeads, normEps: 1e-5, ropeStyle, qkvBias, bits: { wq: bits, wk: bits, wv: bits, wo: bits }, quantizedMatmul: 'exact' }
}
