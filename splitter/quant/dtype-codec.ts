/**
 * Any stored dtype to f32 and back, over whole rows: the one switch over `DType` that conversions (quantize, synth)
 * share. Bytes are little-endian as in model files; ggml semantics from `ggml-blocks.ts`.
 */
import { endianness } from 'node:os'
import type { DType } from '../model.ts'
import {
  bf16BytesToF32,
  dequantizeQ4_0,
  dequantizeQ8_0,
  f16BytesToF32,
  f32ToBf16Bytes,
  f32ToF16Bytes,
  quantizeQ4_0,
  quantizeQ8_0,
} from './ggml-blocks.ts'

const LITTLE_ENDIAN_HOST = endianness() === 'LE'

/**
 * `n` values of `dtype` from `bytes` (at least the bytes `n` values need; a q-type's `n` must be a multiple of 32),
 * as [n] f32. f32 input is copied, so the result never aliases `bytes`.
 * Errors: RangeError when `bytes` is too short or `n` is not whole blocks.
 */
export function decodeToF32(dtype: DType, bytes: Uint8Array, n: number): Float32Array {
  switch (dtype) {
    case 'f32': {
      if (bytes.byteLength < n * 4) throw new RangeError(`cannot read ${n} f32 values from ${bytes.byteLength} bytes`)
      if (LITTLE_ENDIAN_HOST) {
        // Copy through Uint8Array (a Node Buffer's slice() would be a view into a shared pool).
        const copy = new Uint8Array(n * 4)
        copy.set(bytes.subarray(0, n * 4))
        return new Float32Array(copy.buffer)
      }
      const view = new DataView(bytes.buffer, bytes.byteOffset, n * 4)
      return Float32Array.from({ length: n }, (_, i) => view.getFloat32(i * 4, true))
    }
    case 'f16':
      return f16BytesToF32(bytes.subarray(0, n * 2))
    case 'bf16':
      return bf16BytesToF32(bytes.subarray(0, n * 2))
    case 'q8_0':
      return dequantizeQ8_0(bytes, n)
    case 'q4_0':
      return dequantizeQ4_0(bytes, n)
  }
}

/**
 * [n] f32 `values` encoded as `dtype` (f32 little-endian, f16/bf16 round to nearest even, q8_0/q4_0 by ggml's
 * reference quantizers; a q-type's n must be a multiple of 32, i.e. whole rows of a quantizable tensor).
 * Errors: RangeError when n is not whole blocks for a q-type.
 */
export function encodeFromF32(dtype: DType, values: Float32Array): Uint8Array {
  switch (dtype) {
    case 'f32': {
      if (LITTLE_ENDIAN_HOST) return new Uint8Array(values.buffer, values.byteOffset, values.byteLength)
      const out = new Uint8Array(values.length * 4)
      const view = new DataView(out.buffer)
      for (let i = 0; i < values.length; i++) view.setFloat32(i * 4, values[i]!, true)
      return out
    }
    case 'f16':
      return f32ToF16Bytes(values)
    case 'bf16':
      return f32ToBf16Bytes(values)
    case 'q8_0':
      return quantizeQ8_0(values)
    case 'q4_0':
      return quantizeQ4_0(values)
  }
}
