/**
 * A streaming GGUF v3 writer (ggml docs/gguf.md): header, metadata key/values of every type, tensor infos, then the
 * tensor data, one tensor at a time from a producer of byte chunks, so at most one chunk of one tensor is in memory.
 * The file is written to `<path>.tmp` and renamed over `path` only when complete.
 */
import { type FileHandle, open, rename, rm } from 'node:fs/promises'
import type { DType } from '../model.ts'
import { tensorBytes } from '../quant/ggml-blocks.ts'
import type { GgufArray } from './gguf.ts'
import {
  T_ARRAY,
  T_BOOL,
  T_FLOAT32,
  T_FLOAT64,
  T_INT8,
  T_INT16,
  T_INT32,
  T_INT64,
  T_STRING,
  T_UINT8,
  T_UINT16,
  T_UINT32,
  T_UINT64,
} from './gguf-value-types.ts'

/** Scalar numeric GGUF value types (gguf.md `gguf_metadata_value_type`). */
export type GgufNumberType = 'u8' | 'i8' | 'u16' | 'i16' | 'u32' | 'i32' | 'f32' | 'u64' | 'i64' | 'f64'

/** A number with its GGUF type, e.g. `{ type: 'u32', value: 2048 }`; 64-bit types also take a bigint. */
export interface GgufTypedNumber {
  readonly type: GgufNumberType
  readonly value: number | bigint
}

/**
 * A metadata value to write. Strings and booleans map to GGUF string / bool; numbers need their type
 * (`GgufTypedNumber`; a bare `number` is not accepted because GGUF has ten numeric types). Arrays: typed arrays keep
 * their element type (Uint8Array → u8, Int32Array → i32, Float32Array → f32, BigInt64Array → i64, ...), `string[]`
 * and `boolean[]` give string / bool arrays, an array of arrays gives nested arrays. These are exactly the values
 * `readGgufMetadata` returns for arrays, so arrays copy losslessly from a read file. An empty JS array is written as
 * an empty string array.
 */
export type GgufWriteValue = string | boolean | GgufTypedNumber | GgufArray

/** Convenience constructors for typed metadata numbers: `gguf.u32(2048)`, `gguf.f32(1e-5)`. */
export const gguf = {
  u8: (value: number): GgufTypedNumber => ({ type: 'u8', value }),
  i8: (value: number): GgufTypedNumber => ({ type: 'i8', value }),
  u16: (value: number): GgufTypedNumber => ({ type: 'u16', value }),
  i16: (value: number): GgufTypedNumber => ({ type: 'i16', value }),
  u32: (value: number): GgufTypedNumber => ({ type: 'u32', value }),
  i32: (value: number): GgufTypedNumber => ({ type: 'i32', value }),
  f32: (value: number): GgufTypedNumber => ({ type: 'f32', value }),
  u64: (value: number | bigint): GgufTypedNumber => ({ type: 'u64', value }),
  i64: (value: number | bigint): GgufTypedNumber => ({ type: 'i64', value }),
  f64: (value: number): GgufTypedNumber => ({ type: 'f64', value }),
} as const

/** A chunk source: sync or async, so CPU-bound producers need not pay a promise per chunk. */
export type ByteChunks = Iterable<Uint8Array> | AsyncIterable<Uint8Array>

/** One tensor to write. */
export interface GgufTensorSpec {
  readonly name: string
  readonly dtype: DType
  /** Outermost first (row-major), like `TensorRef.shape`; written to the file reversed (GGUF `ne`, innermost first). */
  readonly shape: readonly number[]
  /**
   * Produces the tensor's bytes in file order, in chunks of any size (typically a few rows), called once when the
   * writer gets to this tensor. The chunks must add up to exactly `tensorBytes(dtype, shape)`.
   */
  readonly data: () => ByteChunks
}

/** Options of `writeGguf`. */
export interface WriteGgufOptions {
  /** Data alignment in bytes, a power of two; written as `general.alignment` (u32). Default 32. */
  readonly alignment?: number
  /** Called after each chunk: bytes of tensor data written so far / in total, and the tensor being written. */
  readonly onProgress?: (doneBytes: number, totalBytes: number, tensor: string) => void
  readonly signal?: AbortSignal
}

/** What `writeGguf` wrote. */
export interface WriteGgufResult {
  readonly fileBytes: number
  /** Absolute offset of the tensor data section. */
  readonly dataOffsetBytes: number
  readonly tensorDataBytes: number
}

/** ggml type id of each dtype (ggml.h `enum ggml_type`). */
export const GGML_TYPE_IDS: Readonly<Record<DType, number>> = { f32: 0, f16: 1, q4_0: 2, q8_0: 8, bf16: 30 }


const NUMBER_TYPES: Readonly<Record<GgufNumberType, number>> = {
  u8: T_UINT8,
  i8: T_INT8,
  u16: T_UINT16,
  i16: T_INT16,
  u32: T_UINT32,
  i32: T_INT32,
  f32: T_FLOAT32,
  u64: T_UINT64,
  i64: T_INT64,
  f64: T_FLOAT64,
}

/** Buffer size of data writes, bytes: chunks are gathered up to this before one `write` call. */
const WRITE_BUFFER_BYTES = 4 << 20

/** Little-endian encoder into a growing buffer (the header: metadata and tensor infos). */
class HeaderEncoder {
  #buf = new Uint8Array(1 << 16)
  #view = new DataView(this.#buf.buffer)
  length = 0
  readonly #utf8 = new TextEncoder()

  #reserve(n: number): number {
    const at = this.length
    if (at + n > this.#buf.byteLength) {
      const grown = new Uint8Array(Math.max(at + n, this.#buf.byteLength * 2))
      grown.set(this.#buf.subarray(0, at))
      this.#buf = grown
      this.#view = new DataView(grown.buffer)
    }
    this.length += n
    return at
  }
  u32(v: number): void {
    const at = this.#reserve(4)
    this.#view.setUint32(at, v, true)
  }
  u64(v: number | bigint): void {
    const at = this.#reserve(8)
    this.#view.setBigUint64(at, BigInt(v), true)
  }
  bytes(b: Uint8Array): void {
    const at = this.#reserve(b.byteLength) // may replace #buf: reserve first
    this.#buf.set(b, at)
  }
  string(s: string): void {
    const b = this.#utf8.encode(s)
    this.u64(b.byteLength)
    this.bytes(b)
  }
  /** One number of GGUF type `type`; range-checked so a value never wraps silently. */
  number(type: number, v: number | bigint, key: string): void {
    const int = (lo: number, hi: number): number => {
      const n = Number(v)
      if (!Number.isInteger(n) || n < lo || n > hi) {
        throw new RangeError(`cannot write GGUF metadata ${key}: ${v} does not fit ${typeName(type)} (${lo}..${hi})`)
      }
      return n
    }
    const big = (lo: bigint, hi: bigint): bigint => {
      const b = typeof v === 'bigint' ? v : Number.isInteger(v) ? BigInt(v) : undefined
      if (b === undefined || b < lo || b > hi) {
        throw new RangeError(`cannot write GGUF metadata ${key}: ${v} does not fit ${typeName(type)}`)
      }
      return b
    }
    // Check first, then reserve (which may replace the buffer), then store through the current view.
    switch (type) {
      case T_UINT8: {
        const n = int(0, 0xff)
        this.#view.setUint8(this.#reserve(1), n)
        return
      }
      case T_INT8: {
        const n = int(-0x80, 0x7f)
        this.#view.setInt8(this.#reserve(1), n)
        return
      }
      case T_UINT16: {
        const n = int(0, 0xffff)
        const at = this.#reserve(2)
        this.#view.setUint16(at, n, true)
        return
      }
      case T_INT16: {
        const n = int(-0x8000, 0x7fff)
        const at = this.#reserve(2)
        this.#view.setInt16(at, n, true)
        return
      }
      case T_UINT32: {
        const n = int(0, 0xffffffff)
        const at = this.#reserve(4)
        this.#view.setUint32(at, n, true)
        return
      }
      case T_INT32: {
        const n = int(-0x80000000, 0x7fffffff)
        const at = this.#reserve(4)
        this.#view.setInt32(at, n, true)
        return
      }
      case T_FLOAT32: {
        const at = this.#reserve(4)
        this.#view.setFloat32(at, Number(v), true)
        return
      }
      case T_FLOAT64: {
        const at = this.#reserve(8)
        this.#view.setFloat64(at, Number(v), true)
        return
      }
      case T_UINT64: {
        const b = big(0n, 0xffffffffffffffffn)
        const at = this.#reserve(8)
        this.#view.setBigUint64(at, b, true)
        return
      }
      case T_INT64: {
        const b = big(-(1n << 63n), (1n << 63n) - 1n)
        const at = this.#reserve(8)
        this.#view.setBigInt64(at, b, true)
        return
      }
      default:
        throw new TypeError(`cannot write GGUF metadata ${key}: type ${type} is not numeric`)
    }
  }
  done(): Uint8Array {
    return this.#buf.subarray(0, this.length)
  }
}

function typeName(type: number): string {
  return Object.entries(NUMBER_TYPES).find(([, id]) => id === type)?.[0] ?? String(type)
}

/** GGUF element type of an array value, and how to write its elements. */
function arrayElementType(a: GgufArray, key: string): number {
  if (a instanceof Uint8Array) return T_UINT8
  if (a instanceof Int8Array) return T_INT8
  if (a instanceof Uint16Array) return T_UINT16
  if (a instanceof Int16Array) return T_INT16
  if (a instanceof Uint32Array) return T_UINT32
  if (a instanceof Int32Array) return T_INT32
  if (a instanceof Float32Array) return T_FLOAT32
  if (a instanceof Float64Array) return T_FLOAT64
  if (a instanceof BigUint64Array) return T_UINT64
  if (a instanceof BigInt64Array) return T_INT64
  const first = (a as readonly unknown[])[0]
  if (first === undefined || typeof first === 'string') return T_STRING
  if (typeof first === 'boolean') return T_BOOL
  if (Array.isArray(first) || ArrayBuffer.isView(first)) return T_ARRAY
  throw new TypeError(`cannot write GGUF metadata ${key}: array elements must be strings, booleans or arrays`)
}

function encodeValue(enc: HeaderEncoder, key: string, value: GgufWriteValue, withType: boolean): void {
  if (typeof value === 'string') {
    if (withType) enc.u32(T_STRING)
    enc.string(value)
  } else if (typeof value === 'boolean') {
    if (withType) enc.u32(T_BOOL)
    enc.bytes(Uint8Array.of(value ? 1 : 0))
  } else if (Array.isArray(value) || ArrayBuffer.isView(value)) {
    if (withType) enc.u32(T_ARRAY)
    encodeArray(enc, key, value as GgufArray)
  } else if (typeof value === 'object' && value !== null && 'type' in value) {
    const type = NUMBER_TYPES[value.type]
    if (type === undefined) throw new TypeError(`cannot write GGUF metadata ${key}: unknown number type ${value.type}`)
    if (withType) enc.u32(type)
    enc.number(type, value.value, key)
  } else {
    throw new TypeError(
      `cannot write GGUF metadata ${key}: ${typeof value} values need a type, e.g. gguf.u32(n) or gguf.f32(x)`,
    )
  }
}

function encodeArray(enc: HeaderEncoder, key: string, a: GgufArray): void {
  const type = arrayElementType(a, key)
  enc.u32(type)
  enc.u64(a.length)
  if (type === T_STRING) {
    for (const s of a as readonly unknown[]) {
      if (typeof s !== 'string') throw new TypeError(`cannot write GGUF metadata ${key}: mixed string array`)
      enc.string(s)
    }
  } else if (type === T_BOOL) {
    for (const b of a as readonly unknown[]) {
      if (typeof b !== 'boolean') throw new TypeError(`cannot write GGUF metadata ${key}: mixed bool array`)
      enc.bytes(Uint8Array.of(b ? 1 : 0))
    }
  } else if (type === T_ARRAY) {
    for (const inner of a as readonly GgufArray[]) encodeArray(enc, key, inner)
  } else {
    // Typed arrays: copy the raw bytes (little-endian hosts) or encode element by element.
    const view = a as Exclude<GgufArray, readonly unknown[]>
    if (new Uint8Array(new Uint16Array([1]).buffer)[0] === 1) {
      enc.bytes(new Uint8Array(view.buffer, view.byteOffset, view.byteLength))
    } else {
      for (const x of view) enc.number(type, x, key)
    }
  }
}

/**
 * Writes a GGUF v3 file: magic, version 3, tensor count, metadata count, the metadata (in the given order, then
 * `general.alignment` as u32 unless given), the tensor infos (name, dims innermost first, ggml type id — F32 0, F16 1,
 * Q4_0 2, Q8_0 8, BF16 30 — offset in the data section), zero padding to the alignment, then each tensor's bytes from
 * its `data()` producer, each tensor starting at a multiple of the alignment. Writes `<path>.tmp` and renames it to
 * `path` when everything is written; on any error (or abort) the temporary file is removed and nothing is left at
 * `path`.
 * Errors: RangeError for a q-type tensor whose innermost dimension is not a multiple of 32, a metadata number that
 * does not fit its type, or a producer yielding more or fewer bytes than the tensor needs (naming the tensor);
 * TypeError for an untyped number or a duplicate tensor name; file-system errors as thrown by node:fs.
 * Source: ggml docs/gguf.md.
 * @example
 * await writeGguf('out.gguf', new Map([['general.architecture', 'llama'], ['llama.block_count', gguf.u32(2)]]), [
 *   { name: 'output_norm.weight', dtype: 'f32', shape: [64], data: () => [new Uint8Array(new Float32Array(64).fill(1).buffer)] },
 * ])
 */
export async function writeGguf(
  path: string,
  metadata: Iterable<readonly [string, GgufWriteValue]>,
  tensors: readonly GgufTensorSpec[],
  options: WriteGgufOptions = {},
): Promise<WriteGgufResult> {
  const alignment = options.alignment ?? 32
  if (!Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    throw new RangeError(`cannot write GGUF with alignment ${alignment}: expected a power of two`)
  }
  const entries = [...metadata].filter(([key]) => key !== 'general.alignment')
  entries.push(['general.alignment', gguf.u32(alignment)])
  const keys = new Set<string>()
  for (const [key] of entries) {
    if (keys.has(key)) throw new TypeError(`cannot write GGUF metadata ${key} twice`)
    keys.add(key)
  }

  // Tensor layout: [name, byteLength, relOffset].
  const names = new Set<string>()
  const layout: { spec: GgufTensorSpec; byteLength: number; relOffsetBytes: number }[] = []
  let rel = 0
  for (const spec of tensors) {
    if (names.has(spec.name)) throw new TypeError(`cannot write tensor ${spec.name} twice`)
    names.add(spec.name)
    if (spec.shape.length < 1 || spec.shape.length > 4) {
      throw new RangeError(`cannot write tensor ${spec.name} of shape [${spec.shape.join(', ')}]: GGUF allows 1..4 dims`)
    }
    const byteLength = tensorBytes(spec.dtype, spec.shape)
    layout.push({ spec, byteLength, relOffsetBytes: rel })
    rel = alignUp(rel + byteLength, alignment)
  }
  const lastEnd = layout.length === 0 ? 0 : layout.at(-1)!.relOffsetBytes + layout.at(-1)!.byteLength
  const tensorDataBytes = lastEnd

  const enc = new HeaderEncoder()
  enc.bytes(new TextEncoder().encode('GGUF'))
  enc.u32(3)
  enc.u64(layout.length)
  enc.u64(entries.length)
  for (const [key, value] of entries) {
    enc.string(key)
    encodeValue(enc, key, value, true)
  }
  for (const { spec, relOffsetBytes } of layout) {
    enc.string(spec.name)
    enc.u32(spec.shape.length)
    for (let d = spec.shape.length - 1; d >= 0; d--) enc.u64(spec.shape[d]!)
    enc.u32(GGML_TYPE_IDS[spec.dtype])
    enc.u64(relOffsetBytes)
  }
  const header = enc.done()
  const dataOffsetBytes = alignUp(header.byteLength, alignment)

  const tmp = `${path}.tmp`
  const fh = await open(tmp, 'w')
  let closed = false
  try {
    const out = new BufferedFile(fh)
    await out.write(header)
    await out.zeros(dataOffsetBytes - header.byteLength)
    const totalDataBytes = layout.reduce((sum, t) => sum + t.byteLength, 0)
    let done = 0
    for (const { spec, byteLength, relOffsetBytes } of layout) {
      options.signal?.throwIfAborted()
      await out.zeros(dataOffsetBytes + relOffsetBytes - out.position)
      let written = 0
      for await (const chunk of spec.data()) {
        options.signal?.throwIfAborted()
        written += chunk.byteLength
        if (written > byteLength) {
          throw new RangeError(
            `tensor ${spec.name} [${spec.shape.join(', ')}] ${spec.dtype} needs ${byteLength} bytes, its data gave more`,
          )
        }
        await out.write(chunk)
        done += chunk.byteLength
        options.onProgress?.(done, totalDataBytes, spec.name)
      }
      if (written !== byteLength) {
        throw new RangeError(
          `tensor ${spec.name} [${spec.shape.join(', ')}] ${spec.dtype} needs ${byteLength} bytes, its data gave ${written}`,
        )
      }
    }
    await out.flush()
    await fh.sync()
    await fh.close()
    closed = true
    await rename(tmp, path)
    return { fileBytes: dataOffsetBytes + tensorDataBytes, dataOffsetBytes, tensorDataBytes }
  } catch (err) {
    if (!closed) await fh.close().catch(() => {})
    await rm(tmp, { force: true }).catch(() => {})
    throw err
  }
}

function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment
}

/** Sequential writes gathered into a fixed buffer; large chunks go straight through. */
class BufferedFile {
  readonly #fh: FileHandle
  readonly #buf = new Uint8Array(WRITE_BUFFER_BYTES)
  #used = 0
  position = 0

  constructor(fh: FileHandle) {
    this.#fh = fh
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.#used + chunk.byteLength > this.#buf.byteLength) await this.flush()
    if (chunk.byteLength >= this.#buf.byteLength) {
      await this.#writeAll(chunk)
    } else {
      this.#buf.set(chunk, this.#used)
      this.#used += chunk.byteLength
    }
    this.position += chunk.byteLength
  }

  async zeros(n: number): Promise<void> {
    if (n > 0) await this.write(new Uint8Array(n))
  }

  async flush(): Promise<void> {
    if (this.#used === 0) return
    await this.#writeAll(this.#buf.subarray(0, this.#used))
    this.#used = 0
  }

  async #writeAll(bytes: Uint8Array): Promise<void> {
    let off = 0
    while (off < bytes.byteLength) {
      const { bytesWritten } = await this.#fh.write(bytes, off, bytes.byteLength - off)
      off += bytesWritten
    }
  }
}
