/**
 * IEEE 754 binary16 (half precision) conversion for tensors on the wire. Encoding and decoding use the engine's
 * Float16Array where there is one (Node 24; about twice and three times as fast) and plain integer arithmetic or a
 * table otherwise (Node 22) — same results.
 *
 * Encoding rounds to nearest, ties to even (Giesen, "float_to_half_fast3_rtne"); finite values beyond the f16 range
 * saturate to ±65504 instead of becoming ±Infinity (one outlier must not turn a sum into NaN), ±Infinity stays
 * ±Infinity, NaN stays NaN. Relative error of a normal value ≤ 2^-11 ≈ 4.9e-4; below 2^-14 ≈ 6.1e-5 the absolute
 * error is ≤ 2^-25 ≈ 3e-8 (subnormals). Decoding is exact (the engine's conversion, or a 65536-entry table, 256 KiB,
 * built on first use).
 */

/** Largest finite f16, as f16 bits without sign. */
const F16_MAX_BITS = 0x7bff
const F16_INF_BITS = 0x7c00

const scratchF32 = new Float32Array(1)
const scratchU32 = new Uint32Array(scratchF32.buffer)

/** f16 bits of the f32 whose bits are `x` (round to nearest even, finite overflow saturates). */
function halfBits(x: number): number {
  const sign = (x >>> 16) & 0x8000
  const abs = x & 0x7fffffff
  if (abs >= 0x7f800000) return sign | (abs > 0x7f800000 ? 0x7e00 : F16_INF_BITS) // NaN or ±Infinity
  if (abs >= 0x47800000) return sign | F16_MAX_BITS // ≥ 65536: saturate
  if (abs < 0x38800000) {
    // below 2^-14: f16 subnormal or zero; adding 0.5 lets the f32 rounding place the bits (exact in f64, one fround)
    scratchU32[0] = abs
    scratchF32[0] = scratchF32[0]! + 0.5
    return sign | (scratchU32[0]! - 0x3f000000)
  }
  const mantissaOdd = (abs >>> 13) & 1
  let bits = abs + ((15 - 127) << 23) + 0xfff + mantissaOdd // re-bias the exponent, round to nearest even
  bits >>>= 13
  return sign | (bits >= F16_INF_BITS ? F16_MAX_BITS : bits) // 65520 ≤ |x| < 65536 rounds up to 2^16: saturate
}

let decodeTable: Float32Array | undefined

/** Reused by `addF16Into` for the decoded values ([≥ n] f32; grows, never shrinks). */
let addScratch = new Float32Array(0)

/** The f32 value of every f16 bit pattern ([65536] f32). */
function table(): Float32Array {
  if (decodeTable !== undefined) return decodeTable
  const out = new Float32Array(65536)
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1
    const exponent = (h >>> 10) & 0x1f
    const mantissa = h & 0x3ff
    if (exponent === 0) out[h] = sign * mantissa * 2 ** -24
    else if (exponent === 31) out[h] = mantissa === 0 ? sign * Number.POSITIVE_INFINITY : Number.NaN
    else out[h] = sign * (1 + mantissa / 1024) * 2 ** (exponent - 15)
  }
  decodeTable = out
  return out
}

/** The engine's Float16Array constructor (ES2025), when present. */
type Float16ArrayConstructor = new (
  buffer: ArrayBufferLike,
  byteOffset: number,
  length: number,
) => ArrayLike<number> & { set(values: ArrayLike<number>): void }
const NativeFloat16Array = (globalThis as { Float16Array?: Float16ArrayConstructor }).Float16Array

function checkLengths(what: string, source: number, target: number): void {
  if (source !== target) throw new RangeError(`cannot ${what}: source has ${source} values, target ${target}`)
}

/**
 * f16 bits of `values` ([n] f32 → [n] u16), into `out` if given.
 * @throws RangeError if `out` has another length
 */
export function encodeF16(values: Float32Array, out: Uint16Array = new Uint16Array(values.length)): Uint16Array {
  checkLengths('encode f16', values.length, out.length)
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length)
  if (NativeFloat16Array === undefined) {
    for (let k = 0; k < bits.length; k++) out[k] = halfBits(bits[k]!)
    return out
  }
  new NativeFloat16Array(out.buffer, out.byteOffset, out.length).set(values) // round to nearest even
  for (let k = 0; k < out.length; k++) {
    // the native conversion overflows to ±Infinity: redo those (and NaN, Infinity: same bits) the saturating way
    if ((out[k]! & F16_INF_BITS) === F16_INF_BITS) out[k] = halfBits(bits[k]!)
  }
  return out
}

/**
 * f32 values of f16 bits ([n] u16 → [n] f32, exact), into `out` if given.
 * @throws RangeError if `out` has another length
 */
export function decodeF16(halves: Uint16Array, out: Float32Array = new Float32Array(halves.length)): Float32Array {
  checkLengths('decode f16', halves.length, out.length)
  if (NativeFloat16Array !== undefined) {
    out.set(new NativeFloat16Array(halves.buffer, halves.byteOffset, halves.length)) // exact widening
    return out
  }
  const t = table()
  for (let k = 0; k < halves.length; k++) out[k] = t[halves[k]!]!
  return out
}

/**
 * `sum[k] += f16 value of halves[k]` for every k ([n] f32 += [n] u16), each addition rounded to f32.
 * @throws RangeError if the lengths differ
 */
export function addF16Into(sum: Float32Array, halves: Uint16Array): void {
  checkLengths('add f16', halves.length, sum.length)
  if (NativeFloat16Array !== undefined) {
    if (addScratch.length < halves.length) addScratch = new Float32Array(halves.length)
    const values = decodeF16(halves, addScratch.subarray(0, halves.length)) // [n] f32
    for (let k = 0; k < values.length; k++) sum[k]! += values[k]!
    return
  }
  const t = table()
  for (let k = 0; k < halves.length; k++) sum[k]! += t[halves[k]!]!
}

/** Replace every value by its f16 rounding (same rules as `encodeF16`), in place. */
export function roundToF16InPlace(values: Float32Array): void {
  const t = table()
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length)
  for (let k = 0; k < bits.length; k++) values[k] = t[halfBits(bits[k]!)]!
}
