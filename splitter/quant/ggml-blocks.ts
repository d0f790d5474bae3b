/**
 * ggml block quantization (Q8_0, Q4_0) and half-precision conversions (f16, bf16), bit-exact with ggml's reference
 * code (ggml/src/ggml-quants.c `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `dequantize_row_q8_0`,
 * `dequantize_row_q4_0`; ggml/src/ggml-impl.h `ggml_compute_fp32_to_bf16`). All functions are pure; bytes are
 * little-endian as in GGUF files.
 *
 * Block layouts (QK = 32 weights per block, blocks run along a tensor's innermost dimension):
 * - Q8_0, 34 bytes: f16 scale d, then 32 int8 q; value = q·d.
 * - Q4_0, 18 bytes: f16 scale d, then 16 bytes; byte j holds weight j in its low nibble and weight j + 16 in its high
 *   nibble; value = (nibble − 8)·d.
 */
import type { DType } from '../model.ts'

/** Weights per Q8_0 / Q4_0 block (ggml `QK8_0`, `QK4_0`). */
export const QK = 32
/** Bytes per Q8_0 block: f16 scale + 32 int8 (ggml `block_q8_0`). */
export const Q8_0_BLOCK_BYTES = 34
/** Bytes per Q4_0 block: f16 scale + 16 bytes of nibbles (ggml `block_q4_0`). */
export const Q4_0_BLOCK_BYTES = 18

const f32 = Math.fround

/** Checks that `n` values make whole blocks; returns the block count. */
function blockCount(n: number, what: string): number {
  if (!Number.isInteger(n) || n < 0 || n % QK !== 0) {
    throw new RangeError(`cannot ${what} ${n} values: blocks hold ${QK}, so the count must be a multiple of ${QK}`)
  }
  return n / QK
}

function checkBytes(bytes: Uint8Array, needBytes: number, n: number, type: string): void {
  if (bytes.byteLength < needBytes) {
    throw new RangeError(`cannot dequantize ${n} ${type} values from ${bytes.byteLength} bytes: they need ${needBytes}`)
  }
}

/**
 * Quantizes `values` ([n] f32, n a multiple of 32) to Q8_0: [n/32 × 34] bytes. Per block (ggml
 * `quantize_row_q8_0_ref`): d = amax/127, id = 1/d (0 when d = 0), q = roundf(x·id), all in f32; d stored as f16.
 * Errors: RangeError when n is not a multiple of 32.
 */
export function quantizeQ8_0(values: Float32Array): Uint8Array {
  const nBlocks = blockCount(values.length, 'quantize to q8_0')
  const out = new Uint8Array(nBlocks * Q8_0_BLOCK_BYTES) // [nBlocks × 34]
  const view = new DataView(out.buffer)
  const qs = new Int8Array(out.buffer) // the same bytes as int8
  for (let b = 0; b < nBlocks; b++) {
    const base = b * QK
    let amax = 0
    for (let j = 0; j < QK; j++) {
      const a = Math.abs(values[base + j]!)
      if (a > amax) amax = a
    }
    const d = f32(amax / 127)
    const id = d !== 0 ? f32(1 / d) : 0
    const o = b * Q8_0_BLOCK_BYTES
    view.setFloat16(o, d, true)
    for (let j = 0; j < QK; j++) {
      // roundf: v ± 0.5 is exact in double for an f32 v of magnitude ≤ 127.5, so trunc gives halves away from zero.
      const v = f32(values[base + j]! * id)
      qs[o + 2 + j] = Math.trunc(v < 0 ? v - 0.5 : v + 0.5)
    }
  }
  return out
}

/**
 * Dequantizes `n` values (a multiple of 32) from Q8_0 bytes ([n/32 × 34], extra bytes ignored): value = q·d
 * (ggml `dequantize_row_q8_0`). Returns [n] f32.
 * Errors: RangeError when n is not a multiple of 32 or `bytes` is too short.
 */
export function dequantizeQ8_0(bytes: Uint8Array, n: number): Float32Array {
  const nBlocks = blockCount(n, 'dequantize from q8_0')
  checkBytes(bytes, nBlocks * Q8_0_BLOCK_BYTES, n, 'q8_0')
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const out = new Float32Array(n) // [n] f32
  for (let b = 0; b < nBlocks; b++) {
    const o = b * Q8_0_BLOCK_BYTES
    const d = view.getFloat16(o, true)
    for (let j = 0; j < QK; j++) {
      out[b * QK + j] = view.getInt8(o + 2 + j) * d
    }
  }
  return out
}

/**
 * Quantizes `values` ([n] f32, n a multiple of 32) to Q4_0: [n/32 × 18] bytes. Per block (ggml
 * `quantize_row_q4_0_ref`): max = the value of largest |x| (signed; the first one on ties), d = max/−8,
 * id = 1/d (0 when d = 0), q = min(15, trunc(x·id + 8.5)), all in f32; d stored as f16.
 * Errors: RangeError when n is not a multiple of 32.
 */
export function quantizeQ4_0(values: Float32Array): Uint8Array {
  const nBlocks = blockCount(values.length, 'quantize to q4_0')
  const out = new Uint8Array(nBlocks * Q4_0_BLOCK_BYTES) // [nBlocks × 18]
  const view = new DataView(out.buffer)
  const half = QK / 2
  for (let b = 0; b < nBlocks; b++) {
    const base = b * QK
    let amax = 0
    let max = 0
    for (let j = 0; j < QK; j++) {
      const v = values[base + j]!
      if (amax < Math.abs(v)) {
        amax = Math.abs(v)
        max = v
      }
    }
    const d = f32(max / -8)
    const id = d !== 0 ? f32(1 / d) : 0
    const o = b * Q4_0_BLOCK_BYTES
    view.setFloat16(o, d, true)
    for (let j = 0; j < half; j++) {
      const x0 = f32(values[base + j]! * id)
      const x1 = f32(values[base + half + j]! * id)
      const q0 = Math.min(15, Math.trunc(f32(x0 + 8.5)))
      const q1 = Math.min(15, Math.trunc(f32(x1 + 8.5)))
      out[o + 2 + j] = q0 | (q1 << 4)
    }
  }
  return out
}

/**
 * Dequantizes `n` values (a multiple of 32) from Q4_0 bytes ([n/32 × 18], extra bytes ignored):
 * value = (nibble − 8)·d, low nibbles weights 0–15, high nibbles 16–31 (ggml `dequantize_row_q4_0`). Returns [n] f32.
 * Errors: RangeError when n is not a multiple of 32 or `bytes` is too short.
 */
export function dequantizeQ4_0(bytes: Uint8Array, n: number): Float32Array {
  const nBlocks = blockCount(n, 'dequantize from q4_0')
  checkBytes(bytes, nBlocks * Q4_0_BLOCK_BYTES, n, 'q4_0')
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const out = new Float32Array(n) // [n] f32
  const half = QK / 2
  for (let b = 0; b < nBlocks; b++) {
    const o = b * Q4_0_BLOCK_BYTES
    const d = view.getFloat16(o, true)
    for (let j = 0; j < half; j++) {
      const q = bytes[o + 2 + j]!
      out[b * QK + j] = ((q & 0x0f) - 8) * d
      out[b * QK + half + j] = ((q >> 4) - 8) * d
    }
  }
  return out
}

/**
 * f32 → IEEE half ([n] f32 → [2n] bytes, little-endian), round to nearest even, overflow to ±∞ (ggml
 * `GGML_FP32_TO_FP16`, via Float16Array / DataView.setFloat16).
 */
export function f32ToF16Bytes(values: Float32Array): Uint8Array {
  const out = new Uint8Array(values.length * 2) // [n × 2]
  const view = new DataView(out.buffer)
  for (let i = 0; i < values.length; i++) view.setFloat16(i * 2, values[i]!, true)
  return out
}

/** IEEE half → f32 ([2n] little-endian bytes → [n] f32, exact). Errors: RangeError on an odd byte count. */
export function f16BytesToF32(bytes: Uint8Array): Float32Array {
  if (bytes.byteLength % 2 !== 0) throw new RangeError(`cannot read f16 values from ${bytes.byteLength} bytes: odd count`)
  const n = bytes.byteLength / 2
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const out = new Float32Array(n) // [n] f32
  for (let i = 0; i < n; i++) out[i] = view.getFloat16(i * 2, true)
  return out
}

/**
 * bfloat16 → f32 ([2n] little-endian bytes → [n] f32, exact: the 16 bits become the high half of the f32).
 * Errors: RangeError on an odd byte count.
 */
export function bf16BytesToF32(bytes: Uint8Array): Float32Array {
  if (bytes.byteLength % 2 !== 0) {
    throw new RangeError(`cannot read bf16 values from ${bytes.byteLength} bytes: odd count`)
  }
  const n = bytes.byteLength / 2
  const bits = new Uint32Array(n) // [n] f32 bit patterns
  for (let i = 0; i < n; i++) bits[i] = (bytes[2 * i]! | (bytes[2 * i + 1]! << 8)) << 16
  return new Float32Array(bits.buffer)
}

/**
 * f32 → bfloat16 ([n] f32 → [2n] bytes, little-endian), round to nearest even; NaN stays a quiet NaN (ggml
 * `ggml_compute_fp32_to_bf16`).
 */
export function f32ToBf16Bytes(values: Float32Array): Uint8Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length)
  const aligned = values.byteOffset % 4 === 0 ? bits : new Uint32Array(Float32Array.from(values).buffer)
  const out = new Uint8Array(values.length * 2) // [n × 2]
  for (let i = 0; i < values.length; i++) {
    const u = aligned[i]!
    let h: number
    if ((u & 0x7fffffff) >>> 0 > 0x7f800000) {
      h = (u >>> 16) | 64 // NaN: force quiet
    } else {
      h = ((u + (0x7fff + ((u >>> 16) & 1))) >>> 16) & 0xffff
    }
    out[2 * i] = h & 0xff
    out[2 * i + 1] = h >>> 8
  }
  return out
}

/**
 * Bytes of a tensor of `dtype` and `shape` (outermost first, innermost last): f32 4, f16/bf16 2 per element;
 * q8_0 34 and q4_0 18 per block of 32 along the innermost dimension.
 * Errors: RangeError on a negative or fractional dimension, or when a q-type's innermost dimension is not a multiple
 * of 32 (ggml requires `ne[0] % block size == 0`).
 */
export function tensorBytes(dtype: DType, shape: readonly number[]): number {
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new RangeError(`bad tensor shape [${shape.join(', ')}]: ${d} is not a size`)
  }
  const count = shape.reduce((a, b) => a * b, 1)
  switch (dtype) {
    case 'f32':
      return count * 4
    case 'f16':
    case 'bf16':
      return count * 2
    case 'q8_0':
    case 'q4_0': {
      const inner = shape.at(-1)
      if (inner === undefined || inner % QK !== 0) {
        throw new RangeError(
          `cannot store shape [${shape.join(', ')}] as ${dtype}: the innermost dimension ${inner ?? '(none)'} is ` +
            `not a multiple of ${QK}`,
        )
      }
      return (count / QK) * (dtype === 'q8_0' ? Q8_0_BLOCK_BYTES : Q4_0_BLOCK_BYTES)
    }
  }
}
