/**
 * A model file as the slicer's {@link WeightSource}: what cuts tensor-parallel shards out of a model on disk, on the
 * master and in tests and benches alike.
 */
import { readTensorBytes, readTensorF32, readTensorRange } from './formats/read-tensor.ts'
import type { ModelDescription, TensorRef } from './model.ts'
import { ggmlColumnsToNBits, ggmlToNBits } from './quant/matmul-nbits.ts'
import { type LinearWeight, linearColumns, linearRows, toLinearWeight, type WeightSource } from './slice.ts'

/**
 * The model's tensors as the slicer wants them, each read from the file once and cached until `clear()`:
 * 1-D tensors as f32, 2-D weights as linear weights (quantized ones stay quantized).
 */
export class ModelWeights implements WeightSource {
  readonly #model: ModelDescription
  readonly #cache = new Map<string, LinearWeight | Float32Array>()
  readonly #rawCache = new Map<string, Uint8Array>()

  constructor(model: ModelDescription) {
    this.#model = model
  }

  vector(name: string): Float32Array {
    let t = this.#cache.get(name)
    if (!t) {
      t = readTensorF32(this.#model, name)
      this.#cache.set(name, t)
    }
    return t as Float32Array
  }

  linear(name: string): LinearWeight {
    let t = this.#cache.get(name)
    if (!t) {
      const ref = this.#model.tensors.get(name)
      if (ref?.shape.length !== 2) throw new RangeError(`model ${this.#model.path} has no 2-D tensor ${name}`)
      t = toLinearWeight(ref.dtype, readTensorBytes(this.#model, name), ref.shape[0]!, ref.shape[1]!)
      this.#cache.set(name, t)
    }
    return t as LinearWeight
  }

  /**
   * Output features of a 2-D tensor. For Q4_0/Q8_0 only those rows' blocks are read and re-laid out, so one shard costs
   * its share of the work (a master taking over a lost worker's shard reads and converts a quarter of the model, not
   * all of it); other types are cut from the cached full weight.
   */
  linearRows(name: string, start: number, count: number): LinearWeight {
    const ref = this.#quantized(name)
    if (!ref) return linearRows(this.linear(name), start, count)
    const rows = ref.shape[0]!
    const rowBytes = ref.byteLength / rows
    if (start < 0 || count < 0 || start + count > rows) throw new RangeError(`cannot take rows ${start}..${start + count} of ${name} (${rows} rows)`)
    const bytes = this.#rawCache.get(name)?.subarray(start * rowBytes, (start + count) * rowBytes) ?? readTensorRange(this.#model, name, start * rowBytes, count * rowBytes)
    return ggmlToNBits(ref.dtype, bytes, count, ref.shape[1]!)
  }

  /**
   * Input features of a 2-D tensor. For Q4_0/Q8_0 the raw blocks are read once (cached until the layer is cleared:
   * every row holds some of the columns) and only the kept blocks are re-laid out.
   */
  linearColumns(name: string, start: number, count: number): LinearWeight {
    const ref = this.#quantized(name)
    if (!ref) return linearColumns(this.linear(name), start, count)
    let bytes = this.#rawCache.get(name)
    if (!bytes) {
      bytes = readTensorBytes(this.#model, name)
      this.#rawCache.set(name, bytes)
    }
    return ggmlColumnsToNBits(ref.dtype, bytes, ref.shape[0]!, ref.shape[1]!, start, count)
  }

  /** The reference of 2-D tensor `name` when it is Q4_0/Q8_0, else null. */
  #quantized(name: string): (TensorRef & { dtype: 'q4_0' | 'q8_0' }) | null {
    const ref = this.#model.tensors.get(name)
    if (ref?.shape.length !== 2) throw new RangeError(`model ${this.#model.path} has no 2-D tensor ${name}`)
    return ref.dtype === 'q4_0' || ref.dtype === 'q8_0' ? (ref as TensorRef & { dtype: 'q4_0' | 'q8_0' }) : null
  }

  /** Forgets the cached tensors of layer `layer`. */
  clearLayer(layer: number): void {
    for (const name of this.#rawCache.keys()) if (name.startsWith(`blk.${layer}.`)) this.#rawCache.delete(name)
    for (const name of this.#cache.keys()) if (name.startsWith(`blk.${layer}.`)) this.#cache.delete(name)
  }

  clear(): void {
    this.#cache.clear()
    this.#rawCache.clear()
  }
}

