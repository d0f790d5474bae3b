import { describe, expect, it } from 'vitest'
import {
  bf16BytesToF32,
  dequantizeQ4_0,
  dequantizeQ8_0,
  f16BytesToF32,
  f32ToBf16Bytes,
  f32ToF16Bytes,
  Q4_0_BLOCK_BYTES,
  Q8_0_BLOCK_BYTES,
  QK,
  quantizeQ4_0,
  quantizeQ8_0,
  tensorBytes,
} from '../../../splitter/quant/ggml-blocks.ts'

/** A deterministic pseudo-random sequence in [-scale, scale) (LCG; the tests only need variety). */
function values(n: number, seed: number, scale = 1): Float32Array {
  const out = new Float32Array(n)
  let s = seed >>> 0
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0
    out[i] = (s / 2 ** 32 - 0.5) * 2 * scale
  }
  return out
}

/** The f16 scale stored at the start of a block, as the f32 value ggml reads. */
function scaleOf(bytes: Uint8Array, offset: number): number {
  return new DataView(bytes.buffer, bytes.byteOffset).getFloat16(offset, true)
}

describe('block constants', () => {
  it('match ggml block_q8_0 / block_q4_0', () => {
    expect(QK).toBe(32)
    expect(Q8_0_BLOCK_BYTES).toBe(2 + 32)
    expect(Q4_0_BLOCK_BYTES).toBe(2 + 16)
  })
})

describe('Q8_0 blocks built by hand from the spec', () => {
  it('dequantize to q·d exactly', () => {
    // Block 0: d = 0.5 (f16 0x3800, little-endian 00 38), q = 0, 1, -1, 2, -2, ..., then 127 and -128.
    // Block 1: d = -3 (f16 0xC200), q = j - 16.
    const bytes = new Uint8Array(2 * Q8_0_BLOCK_BYTES)
    bytes.set([0x00, 0x38], 0)
    const q0: number[] = []
    for (let j = 0; j < 30; j++) q0.push(j % 2 === 0 ? j / 2 : -(j + 1) / 2)
    q0.push(127, -128)
    q0.forEach((q, j) => {
      bytes[2 + j] = q & 0xff
    })
    bytes.set([0x00, 0xc2], Q8_0_BLOCK_BYTES)
    for (let j = 0; j < 32; j++) bytes[Q8_0_BLOCK_BYTES + 2 + j] = (j - 16) & 0xff
    const expected = [...q0.map((q) => q * 0.5), ...Array.from({ length: 32 }, (_, j) => (j - 16) * -3)]
    expect(Array.from(dequantizeQ8_0(bytes, 64))).toEqual(expected)
  })

  it('quantize gives the bytes the spec implies (d = amax/127, q = roundf(x/d), halves away from zero)', () => {
    // amax 127 → d = 1 exactly; q = round(x) with roundf's ties away from zero.
    const x = new Float32Array(32)
    x.set([127, -2.5, 2.5, -0.5, 0.5, 1.49, -1.51, 0, -127])
    const bytes = quantizeQ8_0(x)
    expect(Array.from(bytes.subarray(0, 2))).toEqual([0x00, 0x3c]) // f16 1.0
    const q = Array.from(new Int8Array(bytes.buffer, 2, 32))
    expect(q.slice(0, 9)).toEqual([127, -3, 3, -1, 1, 1, -2, 0, -127])
    expect(q.slice(9)).toEqual(new Array(23).fill(0))
  })

  it('an all-zero block has d = 0 and q = 0', () => {
    expect(Array.from(quantizeQ8_0(new Float32Array(32)))).toEqual(new Array(34).fill(0))
  })

  it('round trip error ≤ d/2 per value (plus the f16 rounding of d times |q|)', () => {
    const n = 32 * 200
    const x = values(n, 7, 3)
    // A few blocks with very different ranges.
    for (let j = 0; j < 32; j++) x[32 * 5 + j]! *= 1e-3
    const bytes = quantizeQ8_0(x)
    expect(bytes.byteLength).toBe((n / 32) * 34)
    const y = dequantizeQ8_0(bytes, n)
    for (let b = 0; b < n / 32; b++) {
      let amax = 0
      for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]!))
      const d32 = Math.fround(amax / 127)
      const d16 = scaleOf(bytes, b * 34)
      for (let j = 0; j < 32; j++) {
        const i = b * 32 + j
        const q = new Int8Array(bytes.buffer, b * 34 + 2, 32)[j]!
        expect(y[i]).toBe(q * d16)
        expect(Math.abs(x[i]! - y[i]!)).toBeLessThanOrEqual(d32 / 2 + Math.abs(q) * Math.abs(d32 - d16) + 1e-7 * d32)
      }
    }
  })

  it('refuses counts that are not whole blocks and short buffers', () => {
    expect(() => quantizeQ8_0(new Float32Array(33))).toThrow(RangeError)
    expect(() => dequantizeQ8_0(new Uint8Array(34), 31)).toThrow(RangeError)
    expect(() => dequantizeQ8_0(new Uint8Array(33), 32)).toThrow(/33 bytes/)
  })
})

describe('Q4_0 blocks built by hand from the spec', () => {
  it('dequantize (nibble − 8)·d with low nibbles = weights 0–15, high nibbles = 16–31', () => {
    // d = -0.25 (f16 0xB400). Byte j: low nibble j (weight j), high nibble 15 - j (weight 16 + j).
    const bytes = new Uint8Array(Q4_0_BLOCK_BYTES)
    bytes.set([0x00, 0xb4], 0)
    for (let j = 0; j < 16; j++) bytes[2 + j] = j | ((15 - j) << 4)
    const expected = [
      ...Array.from({ length: 16 }, (_, j) => (j - 8) * -0.25),
      ...Array.from({ length: 16 }, (_, j) => (15 - j - 8) * -0.25),
    ]
    expect(Array.from(dequantizeQ4_0(bytes, 32))).toEqual(expected)
    // Two blocks: the second starts at byte 18.
    const two = new Uint8Array(2 * Q4_0_BLOCK_BYTES)
    two.set(bytes, 0)
    two.set([0x00, 0x40], 18) // d = 2
    two.fill(0x8f, 20) // low nibble 15 → 14, high nibble 8 → 0
    const y = dequantizeQ4_0(two, 64)
    expect(Array.from(y.subarray(32, 48))).toEqual(new Array(16).fill(14))
    expect(Array.from(y.subarray(48, 64))).toEqual(new Array(16).fill(0))
  })

  it('quantize gives the bytes the spec implies (d = max/−8 with max signed, q = min(15, trunc(x/d + 8.5)))', () => {
    // max = -8 → d = 1: q = trunc(x + 8.5) → x = j - 8 gives q = j.
    const x = new Float32Array(32)
    for (let j = 0; j < 16; j++) x[j] = j - 8
    x.set([7.4, 7.5, -0.5, -0.6, 0.49, 6.9], 16)
    const bytes = quantizeQ4_0(x)
    expect(Array.from(bytes.subarray(0, 2))).toEqual([0x00, 0x3c]) // f16 1.0
    const lo = Array.from(bytes.subarray(2), (b) => b & 0x0f)
    const hi = Array.from(bytes.subarray(2), (b) => b >> 4)
    expect(lo).toEqual(Array.from({ length: 16 }, (_, j) => j))
    // 7.4+8.5 = 15.9 → 15; 7.5+8.5 = 16 → 15 (min); -0.5+8.5 = 8; -0.6+8.5 = 7.9 → 7; 0.49+8.5 → 8; 6.9+8.5 → 15.
    expect(hi).toEqual([15, 15, 8, 7, 8, 15, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8])

    // max = +8 → d = -1: q = trunc(8.5 - x); the most negative value clips at 15, i.e. decodes as -7.
    const z = new Float32Array(32)
    z.set([8, -8, 3, -3])
    const zb = quantizeQ4_0(z)
    expect(Array.from(zb.subarray(0, 2))).toEqual([0x00, 0xbc]) // f16 -1.0
    expect(Array.from(dequantizeQ4_0(zb, 32).subarray(0, 4))).toEqual([8, -7, 3, -3])
  })

  it('takes the first value of largest magnitude as max (ties keep the sign of the first)', () => {
    const x = new Float32Array(32)
    x[3] = -2
    x[9] = 2
    const bytes = quantizeQ4_0(x)
    expect(scaleOf(bytes, 0)).toBe(0.25) // max = -2 → d = -2 / -8
  })

  it('round trip error ≤ |d|/2 inside the range, ≤ |d| at the clipped end (plus f16 rounding of d)', () => {
    const n = 32 * 200
    const x = values(n, 11, 0.05)
    const bytes = quantizeQ4_0(x)
    expect(bytes.byteLength).toBe((n / 32) * 18)
    const y = dequantizeQ4_0(bytes, n)
    for (let b = 0; b < n / 32; b++) {
      let amax = 0
      let max = 0
      for (let j = 0; j < 32; j++) {
        const v = x[b * 32 + j]!
        if (Math.abs(v) > amax) {
          amax = Math.abs(v)
          max = v
        }
      }
      const d32 = Math.abs(Math.fround(max / -8))
      const d16 = Math.abs(scaleOf(bytes, b * 18))
      const slack = 8 * Math.abs(d32 - d16) + 1e-7 * d32
      for (let j = 0; j < 32; j++) {
        const i = b * 32 + j
        const clipped = Math.fround(x[i]! / Math.fround(max / -8)) + 8.5 >= 16
        expect(Math.abs(x[i]! - y[i]!)).toBeLessThanOrEqual((clipped ? d32 : d32 / 2) + slack)
      }
    }
  })

  it('refuses counts that are not whole blocks and short buffers', () => {
    expect(() => quantizeQ4_0(new Float32Array(16))).toThrow(RangeError)
    expect(() => dequantizeQ4_0(new Uint8Array(17), 32)).toThrow(RangeError)
  })
})

describe('f16 and bf16', () => {
  it('f16 round trip is exact for f16 values and rounds to nearest even otherwise', () => {
    const exact = new Float32Array([0, -0, 1, -2.5, 65504, 2 ** -24, 0.333251953125, Number.POSITIVE_INFINITY])
    expect(Array.from(f16BytesToF32(f32ToF16Bytes(exact)))).toEqual(Array.from(exact))
    // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even → 1. 1 + 3·2^-11 → 1 + 2^-9.
    const ties = f16BytesToF32(f32ToF16Bytes(new Float32Array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 70000])))
    expect(Array.from(ties)).toEqual([1, 1 + 2 ** -9, Number.POSITIVE_INFINITY])
    // Bytes by hand: 1.0 = 0x3C00, -2 = 0xC000, little-endian.
    expect(Array.from(f32ToF16Bytes(new Float32Array([1, -2])))).toEqual([0x00, 0x3c, 0x00, 0xc0])
    const x = values(1000, 3, 10)
    const back = f16BytesToF32(f32ToF16Bytes(x))
    for (let i = 0; i < x.length; i++) expect(Math.abs(back[i]! - x[i]!)).toBeLessThanOrEqual(Math.abs(x[i]!) * 2 ** -11)
  })

  it('bf16 bytes by hand, round to nearest even, NaN stays NaN', () => {
    expect(Array.from(f32ToBf16Bytes(new Float32Array([1, -2])))).toEqual([0x80, 0x3f, 0x00, 0xc0])
    expect(Array.from(bf16BytesToF32(Uint8Array.of(0x80, 0x3f, 0x49, 0x40)))).toEqual([1, 3.140625])
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7 → 1 (even); 1 + 3·2^-8 → 1 + 2^-6.
    const r = bf16BytesToF32(f32ToBf16Bytes(new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, Number.NaN, -0])))
    expect(r[0]).toBe(1)
    expect(r[1]).toBe(1 + 2 ** -6)
    expect(r[2]).toBeNaN()
    expect(Object.is(r[3], -0)).toBe(true)
    const x = values(1000, 5, 100)
    const back = bf16BytesToF32(f32ToBf16Bytes(x))
    for (let i = 0; i < x.length; i++) expect(Math.abs(back[i]! - x[i]!)).toBeLessThanOrEqual(Math.abs(x[i]!) * 2 ** -8)
    // bf16 values survive exactly.
    expect(Array.from(f32ToBf16Bytes(back))).toEqual(Array.from(f32ToBf16Bytes(x)))
  })

  it('reads from subarrays at odd offsets', () => {
    const buf = new Uint8Array(5)
    buf.set([0x00, 0x3c], 1)
    expect(Array.from(f16BytesToF32(buf.subarray(1, 3)))).toEqual([1])
    expect(Array.from(bf16BytesToF32(Uint8Array.of(9, 0x80, 0x3f).subarray(1)))).toEqual([1])
    expect(() => f16BytesToF32(new Uint8Array(3))).toThrow(RangeError)
  })
})

describe('tensorBytes', () => {
  it('counts elements or blocks along the innermost dimension', () => {
    expect(tensorBytes('f32', [3, 5])).toBe(60)
    expect(tensorBytes('f16', [3, 5])).toBe(30)
    expect(tensorBytes('bf16', [7])).toBe(14)
    expect(tensorBytes('q8_0', [172, 64])).toBe(172 * 2 * 34)
    expect(tensorBytes('q4_0', [2, 3, 64])).toBe(6 * 2 * 18)
  })
  it('throws RangeError when a q-type innermost dim is not a multiple of 32', () => {
    expect(() => tensorBytes('q4_0', [64, 172])).toThrow(RangeError)
    expect(() => tensorBytes('q8_0', [64, 172])).toThrow(/172 is not a multiple of 32/)
    expect(() => tensorBytes('f32', [2, -1])).toThrow(RangeError)
  })
})
