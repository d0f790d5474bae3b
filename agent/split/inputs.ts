/**
 * Reading model inputs for split runs from raw files: `u8` pixels (normalised as `(p/255 − mean) / std`, per channel
 * when several means are given, e.g. Fashion-MNIST's 0.2860406 / 0.3530242) or little-endian `f32` values, items
 * back to back with no header; labels as raw u8.
 */
import { readFile } from 'node:fs/promises'
import { UsageError } from '../errors.ts'
import type { TypedTensor } from '../runtime.ts'
import type { TensorSpec } from './split-model.ts'

/** How to read an input file. */
export interface InputFileOptions {
  /** Element type in the file (default 'u8'). */
  readonly type?: 'u8' | 'f32'
  /** Per-channel (or single) mean and std for u8 normalisation (defaults 0 and 1: x = p/255). */
  readonly mean?: readonly number[]
  readonly std?: readonly number[]
  /** Items to skip and to read (default: all from `offset`). */
  readonly offset?: number
  readonly count?: number
  /** Dims of one item when the model's input has dynamic non-batch dims (e.g. [3, 64, 64]). */
  readonly shape?: readonly number[]
  readonly signal?: AbortSignal
}

/** Dims of one item of `spec` (all but the batch dimension), from `shape` when given. @throws UsageError */
export function itemDims(spec: TensorSpec, shape?: readonly number[]): number[] {
  if (shape) {
    if (shape.length !== spec.dims.length - 1) {
      throw new UsageError(`--shape ${shape.join(',')} has ${shape.length} dims; input ${spec.name} needs ${spec.dims.length - 1} besides the batch`)
    }
    spec.dims.slice(1).forEach((d, i) => {
      if (typeof d === 'number' && d !== shape[i]) throw new UsageError(`--shape ${shape.join(',')}: dim ${i + 1} of input ${spec.name} is fixed at ${d}`)
    })
    return [...shape]
  }
  const dims = spec.dims.slice(1)
  if (!dims.every((d): d is number => typeof d === 'number')) {
    throw new UsageError(`input ${spec.name} has dynamic dims [${spec.dims.join(', ')}]: pass --shape with the dims of one item (e.g. 3,64,64)`)
  }
  return dims
}

/**
 * Reads a batch of items for input `spec` from `path`.
 * @returns float32 [count, ...item] (u8 files normalised)
 * @throws UsageError when the file is missing, its size is not a whole number of items, or the range is past its end
 */
export async function readInputFile(path: string, spec: TensorSpec, options: InputFileOptions = {}): Promise<TypedTensor> {
  const dims = itemDims(spec, options.shape)
  const perItem = dims.reduce((a, b) => a * b, 1)
  const type = options.type ?? 'u8'
  const itemBytes = perItem * (type === 'u8' ? 1 : 4)
  let bytes: Uint8Array
  try {
    bytes = await readFile(path, options.signal ? { signal: options.signal } : {})
  } catch (err) {
    throw new UsageError(`cannot read input file ${path}: ${(err as Error).message}`, { cause: err })
  }
  if (bytes.byteLength % itemBytes !== 0 || bytes.byteLength === 0) {
    throw new UsageError(`input file ${path} has ${bytes.byteLength} bytes, not a whole number of ${type} items of [${dims.join(', ')}] (${itemBytes} bytes each)`)
  }
  const available = bytes.byteLength / itemBytes
  const offset = options.offset ?? 0
  const count = options.count ?? available - offset
  if (offset < 0 || count < 1 || offset + count > available) {
    throw new UsageError(`input file ${path} holds ${available} items; cannot read ${count} from item ${offset}`)
  }
  const out = new Float32Array(count * perItem)
  if (type === 'f32') {
    const copy = new Uint8Array(bytes.subarray(offset * itemBytes, (offset + count) * itemBytes)) // copy: aligned
    out.set(new Float32Array(copy.buffer, 0, count * perItem))
  } else {
    const mean = options.mean ?? [0]
    const std = options.std ?? [1]
    const channels = dims[0] ?? 1
    const inner = perItem / channels
    for (const [what, list] of [['mean', mean], ['std', std]] as const) {
      if (list.length !== 1 && list.length !== channels) throw new UsageError(`--${what} has ${list.length} values; give 1 or ${channels} (one per channel)`)
    }
    if (std.some((s) => s === 0)) throw new UsageError('--std must not be 0')
    const base = offset * itemBytes
    for (let k = 0; k < count * perItem; k++) {
      const c = Math.floor((k % perItem) / inner)
      out[k] = (bytes[base + k]! / 255 - (mean[c] ?? mean[0]!)) / (std[c] ?? std[0]!)
    }
  }
  return { type: 'float32', data: out, dims: [count, ...dims] }
}

/** Reads raw u8 labels `[offset, offset + count)`. @throws UsageError when the file is short */
export async function readLabels(path: string, offset: number, count: number, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
  let bytes: Uint8Array
  try {
    bytes = await readFile(path, options.signal ? { signal: options.signal } : {})
  } catch (err) {
    throw new UsageError(`cannot read labels ${path}: ${(err as Error).message}`, { cause: err })
  }
  if (offset + count > bytes.byteLength) throw new UsageError(`labels ${path} hold ${bytes.byteLength} entries; need ${offset + count}`)
  return bytes.subarray(offset, offset + count)
}
