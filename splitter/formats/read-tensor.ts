/**
 * Reads the bytes of one tensor of a described model (synchronous positional read of exactly that tensor). Each call
 * opens and closes the file, so nothing stays open.
 */
import { endianness } from 'node:os'
import { ModelFormatError } from '../errors.ts'
import type { ModelDescription, TensorRef } from '../model.ts'
import { bf16BytesToF32, dequantizeQ4_0, dequantizeQ8_0, f16BytesToF32, tensorBytes } from '../quant/ggml-blocks.ts'
import { readFully, withModelFile } from './model-file.ts'

const LITTLE_ENDIAN_HOST = endianness() === 'LE'

/**
 * The raw little-endian bytes of tensor `name`: `byteLength` bytes from `offsetBytes` of its file (`ref.file` for a
 * tensor of a sharded safetensors model, else `model.path`), in a fresh buffer (byteOffset 0, so it can be viewed as a
 * typed array of its dtype).
 * Errors: ModelFormatError when the model has no tensor `name`, the file is missing, or it is shorter than the
 * description says (changed since it was loaded).
 */
export function readTensorBytes(model: ModelDescription, name: string): Uint8Array {
  const ref = tensorRef(model, name)
  const file = ref.file ?? model.path
  return withModelFile(file, ({ fd }) => {
    const bytes = new Uint8Array(ref.byteLength)
    const got = readFully(fd, bytes, ref.byteLength, ref.offsetBytes)
    if (got !== ref.byteLength) {
      throw new ModelFormatError(
        file,
        `tensor ${name} needs ${ref.byteLength} bytes at offset ${ref.offsetBytes}, the file ends after ${got}`,
      )
    }
    return bytes
  })
}

/**
 * Bytes `[start, start + length)` of tensor `name`'s raw bytes (e.g. a range of rows of a row-major tensor), read
 * alone, in a fresh buffer.
 * Errors: as `readTensorBytes`; RangeError when the range is outside the tensor.
 */
export function readTensorRange(model: ModelDescription, name: string, start: number, length: number): Uint8Array {
  const ref = tensorRef(model, name)
  if (!Number.isInteger(start) || !Number.isInteger(length) || start < 0 || length < 0 || start + length > ref.byteLength) {
    throw new RangeError(`cannot read bytes ${start}..${start + length} of tensor ${name} (${ref.byteLength} bytes)`)
  }
  const file = ref.file ?? model.path
  return withModelFile(file, ({ fd }) => {
    const bytes = new Uint8Array(length)
    const got = readFully(fd, bytes, length, ref.offsetBytes + start)
    if (got !== length) {
      throw new ModelFormatError(file, `tensor ${name} needs bytes ${start}..${start + length} at offset ${ref.offsetBytes}, the file ends after ${got}`)
    }
    return bytes
  })
}

/**
 * Tensor `name` as f32 values, row-major in its `shape` (e.g. `[out, in]` for a linear weight): f16 and bf16 are
 * widened exactly; q8_0 blocks give q·d and q4_0 blocks (nibble − 8)·d, d the block's f16 scale (ggml
 * `dequantize_row_q8_0` / `dequantize_row_q4_0`, via splitter/quant/ggml-blocks.ts).
 * Errors: as `readTensorBytes`, plus ModelFormatError when `byteLength` disagrees with shape × dtype size (or a
 * q-type's innermost dimension is not a multiple of 32).
 */
export function readTensorF32(model: ModelDescription, name: string): Float32Array {
  const ref = tensorRef(model, name)
  const file = ref.file ?? model.path
  const count = ref.shape.reduce((a, b) => a * b, 1)
  let needBytes: number
  try {
    needBytes = tensorBytes(ref.dtype, ref.shape)
  } catch (err) {
    throw new ModelFormatError(file, `tensor ${name}: ${(err as Error).message}`, { cause: err })
  }
  if (needBytes !== ref.byteLength) {
    throw new ModelFormatError(
      file,
      `tensor ${name} is ${ref.byteLength} bytes at offset ${ref.offsetBytes}, its shape [${ref.shape.join(', ')}] ` +
        `of ${ref.dtype} needs ${needBytes}`,
    )
  }
  const bytes = readTensorBytes(model, name)
  switch (ref.dtype) {
    case 'f32': {
      // [count] f32; the fresh buffer starts at byteOffset 0, so the view is aligned.
      const out = new Float32Array(bytes.buffer, 0, count)
      if (!LITTLE_ENDIAN_HOST) {
        const view = new DataView(bytes.buffer)
        for (let i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true) // in place: reads before writes
      }
      return out
    }
    case 'f16':
      return f16BytesToF32(bytes)
    case 'bf16':
      return bf16BytesToF32(bytes)
    case 'q8_0':
      return dequantizeQ8_0(bytes, count)
    case 'q4_0':
      return dequantizeQ4_0(bytes, count)
  }
}

function tensorRef(model: ModelDescription, name: string): TensorRef {
  const ref = model.tensors.get(name)
  if (ref === undefined) {
    throw new ModelFormatError(model.path, `no tensor named ${name} (the model has ${model.tensors.size} tensors)`)
  }
  return ref
}
