/**
 * Reads the bytes of one tensor of a described model (synchronous positional read of exactly that tensor). Each call
 * opens and closes the file, so nothing stays open.
 */
import { endianness } from 'node:os'
import { ModelFormatError } from '../errors.ts'
import type { ModelDescription, TensorRef } from '../model.ts'
import { readFully, withModelFile } from './model-file.ts'

const LITTLE_ENDIAN_HOST = endianness() === 'LE'

/** Bytes per element of each dtype. */
const ELEMENT_BYTES = { f32: 4, f16: 2 } as const

/**
 * The raw little-endian bytes of tensor `name`: `byteLength` bytes from `offsetBytes` of `model.path`, in a fresh
 * buffer (byteOffset 0, so it can be viewed as a typed array of its dtype).
 * Errors: ModelFormatError when the model has no tensor `name`, the file is missing, or it is shorter than the
 * description says (changed since it was loaded).
 */
export function readTensorBytes(model: ModelDescription, name: string): Uint8Array {
  const ref = tensorRef(model, name)
  return withModelFile(model.path, ({ fd }) => {
    const bytes = new Uint8Array(ref.byteLength)
    const got = readFully(fd, bytes, ref.byteLength, ref.offsetBytes)
    if (got !== ref.byteLength) {
      throw new ModelFormatError(
        model.path,
        `tensor ${name} needs ${ref.byteLength} bytes at offset ${ref.offsetBytes}, the file ends after ${got}`,
      )
    }
    return bytes
  })
}

/**
 * Tensor `name` as f32 values, row-major in its `shape` (e.g. `[out, in]` for a linear weight); f16 is widened.
 * Errors: as `readTensorBytes`, plus ModelFormatError when `byteLength` disagrees with shape × element size.
 */
export function readTensorF32(model: ModelDescription, name: string): Float32Array {
  const ref = tensorRef(model, name)
  const count = ref.shape.reduce((a, b) => a * b, 1)
  if (count * ELEMENT_BYTES[ref.dtype] !== ref.byteLength) {
    throw new ModelFormatError(
      model.path,
      `tensor ${name} is ${ref.byteLength} bytes, its shape [${ref.shape.join(', ')}] of ${ref.dtype} needs ` +
        `${count * ELEMENT_BYTES[ref.dtype]}`,
    )
  }
  const bytes = readTensorBytes(model, name)
  if (LITTLE_ENDIAN_HOST) {
    // [count] f32, or [count] f16 widened by Float32Array.from.
    return ref.dtype === 'f32'
      ? new Float32Array(bytes.buffer, 0, count)
      : Float32Array.from(new Float16Array(bytes.buffer, 0, count))
  }
  const view = new DataView(bytes.buffer)
  const out = new Float32Array(count)
  for (let i = 0; i < count; i++) {
    out[i] = ref.dtype === 'f32' ? view.getFloat32(i * 4, true) : view.getFloat16(i * 2, true)
  }
  return out
}

function tensorRef(model: ModelDescription, name: string): TensorRef {
  const ref = model.tensors.get(name)
  if (ref === undefined) {
    throw new ModelFormatError(model.path, `no tensor named ${name} (the model has ${model.tensors.size} tensors)`)
  }
  return ref
}
