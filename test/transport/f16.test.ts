import { describe, expect, it } from 'vitest'
import { addF16Into, decodeF16, encodeF16, roundToF16InPlace } from '../../transport/f16.ts'
import { seededRandom } from './helpers.ts'

/** Reference binary16 rounding (round to nearest even) of an f64 value, saturating finite overflow at ±65504. */
function referenceF16(x: number): number {
  if (Number.isNaN(x) || !Number.isFinite(x)) return x
  const a = Math.abs(x)
  if (a === 0) return x
  const exponent = Math.max(Math.floor(Math.log2(a)), -14) // subnormals share the step of 2^-14's binade
  const step = 2 ** (exponent - 10)
  let q = a / step
  const floor = Math.floor(q)
  const frac = q - floor
  q = frac > 0.5 || (frac === 0.5 && floor % 2 === 1) ? floor + 1 : floor
  return Math.sign(x) * Math.min(q * step, 65504)
}

function sameValue(a: number, b: number): boolean {
  return Object.is(a, b) || (Number.isNaN(a) && Number.isNaN(b))
}

describe('f16 wire conversion', () => {
  it('rounds to nearest even, saturates finite overflow, keeps infinities, NaN, signed zero and subnormals', () => {
    const cases: [number, number][] = [
      [1, 1],
      [1 + 2 ** -11, 1], // tie: to even (1.0)
      [1 + 3 * 2 ** -11, 1 + 2 ** -9], // tie: to even (mantissa 2)
      [1 + 2 ** -11 + 2 ** -20, 1 + 2 ** -10], // above the tie
      [65504, 65504],
      [65519.99, 65504],
      [65520, 65504], // would round to 2^16 = Infinity: saturates
      [1e9, 65504],
      [-1e9, -65504],
      [Number.POSITIVE_INFINITY, Number.POSITIVE_INFINITY],
      [Number.NEGATIVE_INFINITY, Number.NEGATIVE_INFINITY],
      [-0, -0],
      [2 ** -14, 2 ** -14], // smallest normal
      [2 ** -24, 2 ** -24], // smallest subnormal
      [2 ** -25, 0], // tie between 0 and 2^-24: to even (0)
      [3 * 2 ** -25, 2 ** -23], // tie between 2^-24 and 2^-23: to even
      [1e-10, 0],
    ]
    const values = new Float32Array(cases.map(([x]) => x))
    const decoded = decodeF16(encodeF16(values))
    cases.forEach(([x, want], k) => {
      expect(sameValue(decoded[k]!, want), `f16(${x}) = ${decoded[k]}, want ${want}`).toBe(true)
    })
    expect(Number.isNaN(decodeF16(encodeF16(new Float32Array([Number.NaN])))[0])).toBe(true)
  })

  it('matches a reference rounding on 200 000 seeded values across the whole exponent range', () => {
    const random = seededRandom(21)
    const n = 200_000
    const values = new Float32Array(n)
    for (let k = 0; k < n; k++) values[k] = (random() * 2 - 1) * 2 ** (random() * 48 - 30)
    const decoded = decodeF16(encodeF16(values))
    const inPlace = values.slice()
    roundToF16InPlace(inPlace)
    let mismatches = 0
    for (let k = 0; k < n; k++) {
      const want = referenceF16(values[k]!)
      if (!sameValue(decoded[k]!, want) || !sameValue(inPlace[k]!, want)) mismatches++
    }
    expect(mismatches).toBe(0)
  })

  it('decodes every one of the 65536 bit patterns to its exact value, alone and when adding', () => {
    const bits = Uint16Array.from({ length: 65536 }, (_, h) => h)
    const exact = (h: number): number => {
      const sign = h & 0x8000 ? -1 : 1
      const exponent = (h >>> 10) & 0x1f
      const mantissa = h & 0x3ff
      if (exponent === 0) return sign * mantissa * 2 ** -24
      if (exponent === 31) return mantissa === 0 ? sign * Number.POSITIVE_INFINITY : Number.NaN
      return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15)
    }
    const decoded = decodeF16(bits)
    const added = new Float32Array(65536) // 0 + x = x (and -0 + +0 = +0)
    addF16Into(added, bits)
    let mismatches = 0
    for (let h = 0; h < 65536; h++) {
      const want = exact(h)
      if (!sameValue(decoded[h]!, want) || !sameValue(added[h]!, want === 0 ? 0 : want)) mismatches++
    }
    expect(mismatches).toBe(0)
  })

  it('adds f16 values into an f32 sum with f32 rounding, and checks lengths', () => {
    const sum = new Float32Array([1, 2, 3])
    addF16Into(sum, encodeF16(new Float32Array([0.5, 1e-3, -3])))
    expect(Array.from(sum)).toEqual([1.5, Math.fround(2 + referenceF16(1e-3)), 0])
    expect(() => addF16Into(sum, new Uint16Array(2))).toThrow(RangeError)
    expect(() => encodeF16(sum, new Uint16Array(4))).toThrow(RangeError)
    expect(() => decodeF16(new Uint16Array(4), sum)).toThrow(RangeError)
  })
})
