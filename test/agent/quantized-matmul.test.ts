import { describe, expect, it } from 'vitest'
import { dequantizeQ4_0, dequantizeQ8_0, quantizeQ4_0, quantizeQ8_0 } from '../../splitter/quant/ggml-blocks.ts'
import {
  blockwiseZeroPoint,
  buildFfnBlock,
  ggmlColumnsToNBits,
  ggmlToNBits,
  linearColumns,
  linearRows,
  nbitsColumns,
  nbitsRowF32,
  nbitsToBlockwise,
  type QuantizedInputs,
  type QuantizedMatmul,
  toLinearWeight,
} from '../../splitter/index.ts'
import type { LinearWeight, StreamedLinearWeight } from '../../splitter/index.ts'
import { Session } from '../../agent/runtime.ts'
import { asConstants, linearFeeds } from '../../agent/shard-runner.ts'
import { seededRandom } from '../support/random.ts'

/** Uniform in [-0.5, 0.5), seeded. */
function seeded(seed: number): () => number {
  const random = seededRandom(seed)
  return () => random() - 0.5
}

const DIM = 64
const COLS = 96 // FFN width: 3 blocks of 32

/**
 * An FFN block's output with the given storage of W1/W3/W2, from a real onnxruntime session: weights fed as inputs,
 * or baked as initializers with `options.baked`.
 */
async function ffn(
  h: Float32Array,
  norm: Float32Array,
  w: { w1: StreamedLinearWeight; w3: StreamedLinearWeight; w2: StreamedLinearWeight },
  options: { quantizedMatmul?: QuantizedMatmul; quantizedInputs?: QuantizedInputs; baked?: boolean } = {},
): Promise<Float32Array> {
  const weights = { ffn_norm: { data: norm, dims: [DIM] }, ...linearFeeds('w1', w.w1), ...linearFeeds('w3', w.w3), ...linearFeeds('w2', w.w2) }
  const shape = { dim: DIM, columns: w.w1.rows, normEps: 1e-5, bits: { w1: w.w1.bits, w3: w.w3.bits, w2: w.w2.bits }, ...options }
  if (options.baked) {
    const session = await Session.create('ffn', buildFfnBlock(shape, asConstants(weights)))
    const out = await session.run({ h: { data: h, dims: [h.length / DIM, DIM] } })
    await session.release()
    return out.partial!.data as Float32Array
  }
  const session = await Session.create('ffn', buildFfnBlock(shape))
  const out = await session.run({
    h: { data: h, dims: [h.length / DIM, DIM] },
    ffn_norm: { data: norm, dims: [DIM] },
    ...linearFeeds('w1', w.w1),
    ...linearFeeds('w3', w.w3),
    ...linearFeeds('w2', w.w2),
  })
  await session.release()
  return out.partial!.data as Float32Array
}

function maxRelError(a: Float32Array, b: Float32Array): number {
  let scale = 0
  let err = 0
  for (let i = 0; i < a.length; i++) {
    scale = Math.max(scale, Math.abs(b[i]!))
    err = Math.max(err, Math.abs(a[i]! - b[i]!))
  }
  return err / scale
}

describe.each([
  ['q4_0', quantizeQ4_0, dequantizeQ4_0],
  ['q8_0', quantizeQ8_0, dequantizeQ8_0],
] as const)('%s weights through MatMulNBits', (dtype, quantize, dequantize) => {
  const rand = seeded(dtype === 'q4_0' ? 4 : 8)
  const make = (rows: number, cols: number) => {
    const values = Float32Array.from({ length: rows * cols }, () => rand() * 0.2)
    const bytes = quantize(values)
    return {
      quantized: toLinearWeight(dtype, bytes, rows, cols),
      dense: toLinearWeight('f32', new Uint8Array(dequantize(bytes, rows * cols).buffer), rows, cols),
    }
  }
  const w1 = make(COLS, DIM)
  const w3 = make(COLS, DIM)
  const w2 = make(DIM, COLS)
  const norm = Float32Array.from({ length: DIM }, () => 1 + rand())
  const h = Float32Array.from({ length: 5 * DIM }, () => rand() * 4)

  it('matches an f32 matmul over the dequantized weights within 1e-4 relative', async () => {
    const q = await ffn(h, norm, { w1: w1.quantized, w3: w3.quantized, w2: w2.quantized })
    const f = await ffn(h, norm, { w1: w1.dense, w3: w3.dense, w2: w2.dense })
    expect(maxRelError(q, f)).toBeLessThan(1e-4)
  })

  it('slices rows and 32-column blocks like the dense weight, and refuses a cut inside a block', async () => {
    // A tensor-parallel share: columns 32..96 of the FFN (rows of W1/W3, columns of W2).
    const share = (w: { quantized: LinearWeight; dense: LinearWeight }, byRows: boolean) => ({
      q: byRows ? linearRows(w.quantized, 32, 64) : linearColumns(w.quantized, 32, 64),
      f: byRows ? linearRows(w.dense, 32, 64) : linearColumns(w.dense, 32, 64),
    })
    const [s1, s3, s2] = [share(w1, true), share(w3, true), share(w2, false)]
    const q = await ffn(h, norm, { w1: s1.q, w3: s3.q, w2: s2.q })
    const f = await ffn(h, norm, { w1: s1.f, w3: s3.f, w2: s2.f })
    expect(maxRelError(q, f)).toBeLessThan(1e-4)
    expect(() => linearColumns(w2.quantized, 16, 32)).toThrow(/columns 16..48 .* not on a 32-column block boundary/)
  })

  it('dequantizes single rows (embedding lookup) exactly as the GGUF definition', () => {
    const rows = 3
    const values = Float32Array.from({ length: rows * DIM }, () => rand())
    const bytes = quantize(values)
    const expected = dequantize(bytes, rows * DIM)
    const w = ggmlToNBits(dtype, bytes, rows, DIM)
    for (let r = 0; r < rows; r++) expect([...nbitsRowF32(w, r)]).toEqual([...expected.subarray(r * DIM, (r + 1) * DIM)])
  })
})

describe('ggmlColumnsToNBits', () => {
  it('converts only the kept column blocks, equal to cutting the whole re-laid-out tensor', () => {
    const rand = seeded(21)
    const rows = 5
    const cols = 128 // 4 blocks
    for (const [dtype, quantize] of [['q4_0', quantizeQ4_0], ['q8_0', quantizeQ8_0]] as const) {
      const bytes = quantize(Float32Array.from({ length: rows * cols }, () => rand()))
      for (const [start, count] of [[0, 32], [32, 64], [96, 32], [0, 128]] as const) {
        expect(ggmlColumnsToNBits(dtype, bytes, rows, cols, start, count)).toEqual(nbitsColumns(ggmlToNBits(dtype, bytes, rows, cols), start, count))
      }
      expect(() => ggmlColumnsToNBits(dtype, bytes, rows, cols, 16, 32)).toThrow(/block boundary/)
      expect(() => ggmlColumnsToNBits(dtype, bytes, rows, cols, 96, 64)).toThrow(RangeError)
    }
  })
})

describe('blockwise layout of streamed quantized weights', () => {
  const rand = seeded(33)
  for (const [dtype, quantize, dequantize] of [
    ['q4_0', quantizeQ4_0, dequantizeQ4_0],
    ['q8_0', quantizeQ8_0, dequantizeQ8_0],
  ] as const) {
    it(`${dtype}: holds every weight at [in/32, 32, out] with its block scale`, () => {
      const rows = 3
      const bytes = quantize(Float32Array.from({ length: rows * COLS }, () => rand()))
      const expected = dequantize(bytes, rows * COLS) // [rows, COLS]
      const w = nbitsToBlockwise(ggmlToNBits(dtype, bytes, rows, COLS))
      const zp = blockwiseZeroPoint(w.bits)
      for (let r = 0; r < rows; r++) {
        for (let i = 0; i < COLS; i++) {
          const b = Math.floor(i / 32)
          const value = (w.values[(b * 32 + (i % 32)) * rows + r]! - zp) * w.scales[b * rows + r]!
          expect(value).toBe(expected[r * COLS + i])
        }
      }
    })

    it(`${dtype}: the int8 blockwise kernel matches MatMulNBits at accuracy level 4, the f32 one the exact matmul`, async () => {
      const make = (r: number, c: number) => ggmlToNBits(dtype, quantize(Float32Array.from({ length: r * c }, () => rand() * 0.2)), r, c)
      const w = { w1: make(COLS, DIM), w3: make(COLS, DIM), w2: make(DIM, COLS) }
      const blockwise = { w1: nbitsToBlockwise(w.w1), w3: nbitsToBlockwise(w.w3), w2: nbitsToBlockwise(w.w2) }
      const norm = Float32Array.from({ length: DIM }, () => 1 + rand())
      // 1 row (decode) and 7 rows (a prefill chunk)
      for (const seq of [1, 7]) {
        const h = Float32Array.from({ length: seq * DIM }, () => rand() * 4)
        const int8 = await ffn(h, norm, w, { quantizedMatmul: 'int8', baked: true })
        const exact = await ffn(h, norm, w, { quantizedMatmul: 'exact', baked: true })
        expect(maxRelError(await ffn(h, norm, blockwise, { quantizedInputs: 'blockwise-int8' }), int8)).toBeLessThan(1e-5)
        expect(maxRelError(await ffn(h, norm, blockwise, { quantizedInputs: 'blockwise-f32' }), exact)).toBeLessThan(1e-5)
        // int8 activations are an approximation: about 1 % here, as MatMulNBits' own.
        expect(maxRelError(int8, exact)).toBeGreaterThan(1e-4)
      }
    })
  }
})
