/**
 * The bottleneck codec of split computing: the tensors crossing a cut, quantized and then losslessly compressed into
 * one self-describing payload (BottleFit, Matsubara et al. 2022, §3.3 quantizes the bottleneck to 8 bits; per-channel
 * affine quantization follows Jacob et al. 2018 and ONNX `QuantizeLinear`).
 *
 * Quantization (float32 tensors; other element types always travel raw):
 * - `f32`: raw bytes, lossless.
 * - `f16`: IEEE half precision, round to nearest even (about 3 decimal digits).
 * - `q8` / `q8c`: 8-bit affine per tensor / per channel (axis 1): `q = round((x − min) / scale)`, `scale = (max − min)
 *   / 255`, decoded `x' = min + q·scale`; `|x − x'| ≤ scale / 2`.
 * - `q4` / `q4c`: the same with 16 levels, two values per byte (first value in the low nibble).
 * Then `none`, `deflate` (raw DEFLATE, RFC 1951), `brotli` (RFC 7932) or `zstd` (RFC 8878), all from node:zlib.
 *
 * Payload layout (little-endian):
 *
 * | bytes  | field                                                                                 |
 * |--------|---------------------------------------------------------------------------------------|
 * | 0..2   | magic `EB`                                                                            |
 * | 2      | format version (1)                                                                    |
 * | 3      | compression: 0 none, 1 deflate, 2 brotli, 3 zstd                                      |
 * | 4..8   | u32 CRC-32 (ISO-HDLC, zlib's) of bytes 8..end                                         |
 * | 8..    | the body, compressed as a whole                                                       |
 *
 * Body: LEB128 tensor count, then per tensor: u8 element type (ONNX `TensorProto.DataType` code), u8 quantization
 * (0 raw, 1 f16, 2 q8, 3 q8c, 4 q4, 5 q4c), u8 rank, LEB128 dims (outermost first), for affine modes k f32 scales then
 * k f32 minimums (k = 1 per tensor, dims[1] per channel), then the data (its length follows from the above). The body
 * must be consumed exactly. Anything else is refused with a `CodecError`.
 */
import { brotliCompressSync, brotliDecompressSync, constants, crc32, deflateRawSync, inflateRawSync, zstdCompressSync, zstdDecompressSync } from 'node:zlib'
import { CodecError } from './errors.ts'

/** Quantization of float32 tensors. */
export type CodecQuantization = 'f32' | 'f16' | 'q8' | 'q8c' | 'q4' | 'q4c'
/** Lossless compression of the whole body. */
export type CodecCompression = 'none' | 'deflate' | 'brotli' | 'zstd'

/** A codec: quantization, compression and an optional compression level (zlib 0–9, brotli 0–11, zstd 1–22). */
export interface BottleneckCodec {
  readonly quantization: CodecQuantization
  readonly compression: CodecCompression
  readonly level?: number
}

/** Element types the codec carries (onnxruntime's names), with their ONNX codes and sizes. */
export type CodecElementType = 'float32' | 'float16' | 'float64' | 'int8' | 'uint8' | 'int16' | 'uint16' | 'int32' | 'uint32' | 'int64' | 'uint64' | 'bool'

/** A tensor to encode: `data` holds the product of `dims` elements of `type` (float16 as raw bits). */
export interface CodecTensor {
  readonly type: CodecElementType
  readonly dims: readonly number[]
  readonly data: ArrayBufferView
}

/** A decoded tensor: `data` is a fresh typed array of `type` (float16 as Uint16Array bits, bool as Uint8Array). */
export interface DecodedTensor {
  readonly type: CodecElementType
  readonly dims: readonly number[]
  readonly data:
    | Float32Array
    | Float64Array
    | Int8Array
    | Uint8Array
    | Int16Array
    | Uint16Array
    | Int32Array
    | Uint32Array
    | BigInt64Array
    | BigUint64Array
  /** How the tensor travelled (`f32` = raw bytes, also for non-float types). */
  readonly quantization: CodecQuantization
}

/** Options of {@link decodeBottleneck}. */
export interface DecodeOptions {
  /** Cap on the decompressed body, bytes (default 256 MiB): a payload claiming more is refused. */
  readonly maxBodyBytes?: number
}

const MAGIC0 = 0x45 // 'E'
const MAGIC1 = 0x42 // 'B'
const VERSION = 1
const PREFIX_BYTES = 8
const DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024

const COMPRESSIONS: readonly CodecCompression[] = ['none', 'deflate', 'brotli', 'zstd']
const QUANTIZATIONS: readonly CodecQuantization[] = ['f32', 'f16', 'q8', 'q8c', 'q4', 'q4c']

const TYPES: Readonly<Record<CodecElementType, { code: number; bytes: number }>> = {
  float32: { code: 1, bytes: 4 },
  uint8: { code: 2, bytes: 1 },
  int8: { code: 3, bytes: 1 },
  uint16: { code: 4, bytes: 2 },
  int16: { code: 5, bytes: 2 },
  int32: { code: 6, bytes: 4 },
  int64: { code: 7, bytes: 8 },
  bool: { code: 9, bytes: 1 },
  float16: { code: 10, bytes: 2 },
  float64: { code: 11, bytes: 8 },
  uint32: { code: 12, bytes: 4 },
  uint64: { code: 13, bytes: 8 },
}
const TYPE_BY_CODE = new Map((Object.entries(TYPES) as [CodecElementType, { code: number }][]).map(([t, v]) => [v.code, t]))

/** Every quantization and compression name, for flags and benchmarks. */
export const CODEC_QUANTIZATIONS = QUANTIZATIONS
export const CODEC_COMPRESSIONS = COMPRESSIONS

/**
 * Parses `quantization[+compression[:level]]`, e.g. `q8`, `q8c+zstd`, `f16+brotli:11`.
 * @throws RangeError naming the text and the accepted values
 */
export function parseCodec(text: string): BottleneckCodec {
  const [q, c, extra] = text.trim().split('+')
  const [comp, levelText, extraLevel] = (c ?? 'none').split(':')
  const quantization = q as CodecQuantization
  const compression = comp as CodecCompression
  if (extra !== undefined || extraLevel !== undefined || !QUANTIZATIONS.includes(quantization) || !COMPRESSIONS.includes(compression)) {
    throw new RangeError(`invalid codec '${text}': expected quantization[+compression[:level]] with quantization one of ${QUANTIZATIONS.join('|')} and compression one of ${COMPRESSIONS.join('|')}`)
  }
  if (levelText === undefined) return { quantization, compression }
  const level = Number(levelText)
  if (!Number.isInteger(level) || compression === 'none') throw new RangeError(`invalid codec '${text}': the level must be a whole number and needs a compression`)
  return { quantization, compression, level }
}

/** The canonical text of a codec (inverse of {@link parseCodec}). */
export function codecName(codec: BottleneckCodec): string {
  if (codec.compression === 'none') return codec.quantization
  return `${codec.quantization}+${codec.compression}${codec.level === undefined ? '' : `:${codec.level}`}`
}

// ---- half precision ----------------------------------------------------------------------------------------------

const f32Scratch = new Float32Array(1)
const u32Scratch = new Uint32Array(f32Scratch.buffer)

/** float32 → IEEE 754 binary16 bits, round to nearest even; overflow → ±Inf, NaN stays NaN. */
export function f32ToF16Bits(value: number): number {
  f32Scratch[0] = value
  const x = u32Scratch[0]!
  const sign = (x >>> 16) & 0x8000
  const exp = (x >>> 23) & 0xff
  let mant = x & 0x7fffff
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 : 0)
  const e = exp - 127 + 15
  if (e >= 0x1f) return sign | 0x7c00
  if (e <= 0) {
    if (e < -10) return sign
    mant |= 0x800000
    const shift = 14 - e
    const half = 1 << (shift - 1)
    const rest = mant & ((1 << shift) - 1)
    let h = mant >>> shift
    if (rest > half || (rest === half && (h & 1) === 1)) h++
    return sign | h
  }
  let h = (e << 10) | (mant >>> 13)
  const rest = mant & 0x1fff
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1)) h++ // a carry into the exponent is still correct
  return sign | h
}

/** IEEE 754 binary16 bits → number. */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1
  const exp = (h >>> 10) & 0x1f
  const mant = h & 0x3ff
  if (exp === 0) return sign * mant * 2 ** -24
  if (exp === 0x1f) return mant === 0 ? sign * Number.POSITIVE_INFINITY : Number.NaN
  return sign * (1 + mant / 1024) * 2 ** (exp - 15)
}

// ---- byte writer / reader ----------------------------------------------------------------------------------------

class Writer {
  private buf = new Uint8Array(256)
  private view = new DataView(this.buf.buffer)
  length = 0

  private ensure(n: number): void {
    if (this.length + n <= this.buf.byteLength) return
    let size = this.buf.byteLength * 2
    while (size < this.length + n) size *= 2
    const next = new Uint8Array(size)
    next.set(this.buf.subarray(0, this.length))
    this.buf = next
    this.view = new DataView(next.buffer)
  }

  u8(v: number): void {
    this.ensure(1)
    this.buf[this.length++] = v
  }

  varint(v: number): void {
    let n = v
    do {
      let byte = n % 128
      n = Math.floor(n / 128)
      if (n > 0) byte |= 0x80
      this.u8(byte)
    } while (n > 0)
  }

  f32(v: number): void {
    this.ensure(4)
    this.view.setFloat32(this.length, v, true)
    this.length += 4
  }

  bytes(b: Uint8Array): void {
    this.ensure(b.byteLength)
    this.buf.set(b, this.length)
    this.length += b.byteLength
  }

  /** Reserve `n` bytes and return a view of them to fill. */
  reserve(n: number): Uint8Array {
    this.ensure(n)
    const out = this.buf.subarray(this.length, this.length + n)
    this.length += n
    return out
  }

  result(): Uint8Array {
    return this.buf.subarray(0, this.length)
  }
}

class Reader {
  private at = 0
  private readonly view: DataView
  private readonly buf: Uint8Array

  constructor(buf: Uint8Array) {
    this.buf = buf
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength)
  }

  get remaining(): number {
    return this.buf.byteLength - this.at
  }

  private need(n: number, what: string): void {
    if (this.remaining < n) throw new CodecError(`cannot decode bottleneck payload: body ends inside ${what} (needs ${n} bytes at offset ${this.at}, has ${this.remaining})`)
  }

  u8(what: string): number {
    this.need(1, what)
    return this.buf[this.at++]!
  }

  varint(what: string): number {
    let value = 0
    let scale = 1
    for (let i = 0; i < 8; i++) {
      const byte = this.u8(what)
      value += (byte & 0x7f) * scale
      if ((byte & 0x80) === 0) return value
      scale *= 128
    }
    throw new CodecError(`cannot decode bottleneck payload: ${what} is not a valid LEB128 number`)
  }

  f32(what: string): number {
    this.need(4, what)
    const v = this.view.getFloat32(this.at, true)
    this.at += 4
    return v
  }

  bytes(n: number, what: string): Uint8Array {
    this.need(n, what)
    const out = this.buf.subarray(this.at, this.at + n)
    this.at += n
    return out
  }
}

// ---- quantization ------------------------------------------------------------------------------------------------

function bytesOf(view: ArrayBufferView): Uint8Array {
  return view instanceof Uint8Array ? view : new Uint8Array(view.buffer, view.byteOffset, view.byteLength)
}

function asF32(view: ArrayBufferView, count: number): Float32Array {
  if (view instanceof Float32Array) return view
  const bytes = bytesOf(view)
  if (bytes.byteOffset % 4 === 0) return new Float32Array(bytes.buffer, bytes.byteOffset, count)
  return new Float32Array(new Uint8Array(bytes).buffer, 0, count) // copy (a Buffer's slice() would not copy)
}

/** Channel layout of a tensor for per-channel modes: [outer, channels, inner] along axis 1 (per tensor: 1 channel). */
function channelLayout(dims: readonly number[], perChannel: boolean): { outer: number; channels: number; inner: number } {
  const count = dims.reduce((a, b) => a * b, 1)
  if (!perChannel || dims.length < 2 || dims[1] === 0) return { outer: 1, channels: 1, inner: count }
  const inner = dims.slice(2).reduce((a, b) => a * b, 1)
  return { outer: dims[0]!, channels: dims[1]!, inner }
}

function quantBits(q: CodecQuantization): 8 | 4 {
  return q === 'q4' || q === 'q4c' ? 4 : 8
}

function encodeAffine(w: Writer, x: Float32Array, dims: readonly number[], q: CodecQuantization): void {
  const bits = quantBits(q)
  const levels = (1 << bits) - 1
  const { outer, channels, inner } = channelLayout(dims, q === 'q8c' || q === 'q4c')
  const mins = new Float32Array(channels).fill(Number.POSITIVE_INFINITY)
  const maxs = new Float32Array(channels).fill(Number.NEGATIVE_INFINITY)
  for (let o = 0; o < outer; o++) {
    for (let c = 0; c < channels; c++) {
      const base = (o * channels + c) * inner
      let lo = mins[c]!
      let hi = maxs[c]!
      for (let i = 0; i < inner; i++) {
        const v = x[base + i]!
        if (v < lo) lo = v
        if (v > hi) hi = v
      }
      mins[c] = lo
      maxs[c] = hi
    }
  }
  const scales = new Float32Array(channels)
  for (let c = 0; c < channels; c++) {
    if (!(mins[c]! <= maxs[c]!)) {
      mins[c] = 0 // empty channel
      maxs[c] = 0
    }
    scales[c] = (maxs[c]! - mins[c]!) / levels
  }
  for (let c = 0; c < channels; c++) w.f32(scales[c]!)
  for (let c = 0; c < channels; c++) w.f32(mins[c]!)
  const count = x.length
  const out = w.reserve(bits === 8 ? count : Math.ceil(count / 2))
  if (bits === 4) out.fill(0)
  for (let o = 0; o < outer; o++) {
    for (let c = 0; c < channels; c++) {
      const base = (o * channels + c) * inner
      const scale = scales[c]!
      const min = mins[c]!
      const inv = scale > 0 ? 1 / scale : 0
      for (let i = 0; i < inner; i++) {
        const k = base + i
        let qv = Math.round((x[k]! - min) * inv)
        if (qv < 0) qv = 0
        else if (qv > levels) qv = levels
        if (bits === 8) out[k] = qv
        else out[k >> 1]! |= (k & 1) === 0 ? qv : qv << 4
      }
    }
  }
}

function decodeAffine(r: Reader, dims: readonly number[], count: number, q: CodecQuantization): Float32Array {
  const bits = quantBits(q)
  const { outer, channels, inner } = channelLayout(dims, q === 'q8c' || q === 'q4c')
  const scales = new Float32Array(channels)
  const mins = new Float32Array(channels)
  for (let c = 0; c < channels; c++) scales[c] = r.f32('scales')
  for (let c = 0; c < channels; c++) mins[c] = r.f32('minimums')
  for (let c = 0; c < channels; c++) {
    if (!Number.isFinite(scales[c]!) || !Number.isFinite(mins[c]!) || scales[c]! < 0) {
      throw new CodecError(`cannot decode bottleneck payload: channel ${c} has scale ${scales[c]} and minimum ${mins[c]} (must be finite, scale ≥ 0)`)
    }
  }
  const data = r.bytes(bits === 8 ? count : Math.ceil(count / 2), `${q} data of ${count} values`)
  const out = new Float32Array(count)
  for (let o = 0; o < outer; o++) {
    for (let c = 0; c < channels; c++) {
      const base = (o * channels + c) * inner
      const scale = scales[c]!
      const min = mins[c]!
      for (let i = 0; i < inner; i++) {
        const k = base + i
        const qv = bits === 8 ? data[k]! : (data[k >> 1]! >> ((k & 1) * 4)) & 0xf
        out[k] = min + qv * scale
      }
    }
  }
  return out
}

// ---- payload -----------------------------------------------------------------------------------------------------

function compress(body: Uint8Array, codec: BottleneckCodec): Uint8Array {
  switch (codec.compression) {
    case 'none':
      return body
    case 'deflate':
      return deflateRawSync(body, codec.level === undefined ? {} : { level: codec.level })
    case 'brotli':
      return brotliCompressSync(body, {
        params: {
          [constants.BROTLI_PARAM_QUALITY]: codec.level ?? 9,
          [constants.BROTLI_PARAM_SIZE_HINT]: body.byteLength,
        },
      })
    case 'zstd':
      return zstdCompressSync(body, codec.level === undefined ? {} : { params: { [constants.ZSTD_c_compressionLevel]: codec.level } })
  }
}

function decompress(body: Uint8Array, compression: CodecCompression, maxBodyBytes: number): Uint8Array {
  try {
    switch (compression) {
      case 'none':
        return body
      case 'deflate':
        return inflateRawSync(body, { maxOutputLength: maxBodyBytes })
      case 'brotli':
        return brotliDecompressSync(body, { maxOutputLength: maxBodyBytes })
      case 'zstd':
        return zstdDecompressSync(body, { maxOutputLength: maxBodyBytes })
    }
  } catch (err) {
    throw new CodecError(`cannot decode bottleneck payload: ${compression} body does not decompress: ${(err as Error).message}`, { cause: err })
  }
}

/**
 * Encodes `tensors` (in order) with `codec` into one payload. Float32 tensors are quantized as the codec says; other
 * element types, and float32 tensors with non-finite values under an affine mode, travel raw.
 * @throws RangeError when a tensor's data length does not match its dims and type
 */
export function encodeBottleneck(tensors: readonly CodecTensor[], codec: BottleneckCodec): Uint8Array {
  const w = new Writer()
  w.varint(tensors.length)
  for (const [index, t] of tensors.entries()) {
    const info = TYPES[t.type]
    if (!info) throw new RangeError(`cannot encode tensor ${index}: element type ${String(t.type)} is not supported`)
    const count = t.dims.reduce((a, b) => a * b, 1)
    if (t.data.byteLength !== count * info.bytes) {
      throw new RangeError(`cannot encode tensor ${index}: ${t.data.byteLength} bytes of ${t.type} for dims [${t.dims.join(', ')}] (expected ${count * info.bytes})`)
    }
    let q: CodecQuantization = t.type === 'float32' ? codec.quantization : 'f32'
    const x = t.type === 'float32' ? asF32(t.data, count) : undefined
    if (x && q !== 'f32' && q !== 'f16' && !x.every(Number.isFinite)) q = 'f32'
    w.u8(info.code)
    w.u8(QUANTIZATIONS.indexOf(q))
    w.u8(t.dims.length)
    for (const d of t.dims) w.varint(d)
    if (q === 'f32') w.bytes(bytesOf(t.data))
    else if (q === 'f16') {
      const out = w.reserve(count * 2)
      const view = new DataView(out.buffer, out.byteOffset, out.byteLength)
      for (let k = 0; k < count; k++) view.setUint16(k * 2, f32ToF16Bits(x![k]!), true)
    } else encodeAffine(w, x!, t.dims, q)
  }
  const body = compress(w.result(), codec)
  const payload = new Uint8Array(PREFIX_BYTES + body.byteLength)
  payload[0] = MAGIC0
  payload[1] = MAGIC1
  payload[2] = VERSION
  payload[3] = COMPRESSIONS.indexOf(codec.compression)
  payload.set(body, PREFIX_BYTES)
  new DataView(payload.buffer).setUint32(4, crc32(body), true)
  return payload
}

function typedArrayOf(type: CodecElementType, bytes: Uint8Array, count: number): DecodedTensor['data'] {
  const copy = new Uint8Array(bytes).buffer // copy: zlib returns Buffers, whose slice() is a view into a pool
  switch (type) {
    case 'float32':
      return new Float32Array(copy, 0, count)
    case 'float64':
      return new Float64Array(copy, 0, count)
    case 'float16':
    case 'uint16':
      return new Uint16Array(copy, 0, count)
    case 'int16':
      return new Int16Array(copy, 0, count)
    case 'int8':
      return new Int8Array(copy, 0, count)
    case 'uint8':
    case 'bool':
      return new Uint8Array(copy, 0, count)
    case 'int32':
      return new Int32Array(copy, 0, count)
    case 'uint32':
      return new Uint32Array(copy, 0, count)
    case 'int64':
      return new BigInt64Array(copy, 0, count)
    case 'uint64':
      return new BigUint64Array(copy, 0, count)
  }
}

/**
 * Decodes a payload of {@link encodeBottleneck}: float32 tensors come back as float32 whatever their quantization.
 * @throws CodecError when the payload is truncated, has a bad magic, version, compression or checksum, an unknown
 *   element type or quantization, lengths that do not add up, or trailing bytes
 */
export function decodeBottleneck(payload: Uint8Array, options: DecodeOptions = {}): DecodedTensor[] {
  if (payload.byteLength < PREFIX_BYTES) throw new CodecError(`cannot decode bottleneck payload: ${payload.byteLength} bytes, shorter than the ${PREFIX_BYTES}-byte prefix`)
  if (payload[0] !== MAGIC0 || payload[1] !== MAGIC1) {
    throw new CodecError(`cannot decode bottleneck payload: magic 0x${payload[0]!.toString(16)}${payload[1]!.toString(16)} is not 'EB'`)
  }
  if (payload[2] !== VERSION) throw new CodecError(`cannot decode bottleneck payload: format version ${payload[2]} (this build reads ${VERSION})`)
  const compression = COMPRESSIONS[payload[3]!]
  if (compression === undefined) throw new CodecError(`cannot decode bottleneck payload: unknown compression id ${payload[3]}`)
  const stored = new DataView(payload.buffer, payload.byteOffset, payload.byteLength).getUint32(4, true)
  const wire = payload.subarray(PREFIX_BYTES)
  const computed = crc32(wire)
  if (stored !== computed) {
    throw new CodecError(`cannot decode bottleneck payload: checksum mismatch (stored 0x${stored.toString(16).padStart(8, '0')}, computed 0x${computed.toString(16).padStart(8, '0')} over ${wire.byteLength} bytes)`)
  }
  const r = new Reader(decompress(wire, compression, options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES))
  const n = r.varint('tensor count')
  if (n > r.remaining) throw new CodecError(`cannot decode bottleneck payload: ${n} tensors in a ${r.remaining}-byte body`)
  const out: DecodedTensor[] = []
  for (let i = 0; i < n; i++) {
    const code = r.u8(`tensor ${i} element type`)
    const type = TYPE_BY_CODE.get(code)
    if (type === undefined) throw new CodecError(`cannot decode bottleneck payload: tensor ${i} has unknown element type code ${code}`)
    const qid = r.u8(`tensor ${i} quantization`)
    const q = QUANTIZATIONS[qid]
    if (q === undefined) throw new CodecError(`cannot decode bottleneck payload: tensor ${i} has unknown quantization id ${qid}`)
    if (q !== 'f32' && type !== 'float32') throw new CodecError(`cannot decode bottleneck payload: tensor ${i} of ${type} claims quantization ${q}`)
    const rank = r.u8(`tensor ${i} rank`)
    const dims: number[] = []
    for (let d = 0; d < rank; d++) dims.push(r.varint(`tensor ${i} dimension ${d}`))
    const count = dims.reduce((a, b) => a * b, 1)
    if (!Number.isSafeInteger(count) || count * TYPES[type].bytes > r.remaining * 16) {
      throw new CodecError(`cannot decode bottleneck payload: tensor ${i} dims [${dims.join(', ')}] do not fit the ${r.remaining} bytes left`)
    }
    let data: DecodedTensor['data']
    if (q === 'f32') data = typedArrayOf(type, r.bytes(count * TYPES[type].bytes, `tensor ${i} data`), count)
    else if (q === 'f16') {
      const bits = r.bytes(count * 2, `tensor ${i} f16 data`)
      const view = new DataView(bits.buffer, bits.byteOffset, bits.byteLength)
      const f = new Float32Array(count)
      for (let k = 0; k < count; k++) f[k] = f16BitsToF32(view.getUint16(k * 2, true))
      data = f
    } else data = decodeAffine(r, dims, count, q)
    out.push({ type, dims, data, quantization: q })
  }
  if (r.remaining !== 0) throw new CodecError(`cannot decode bottleneck payload: ${r.remaining} trailing bytes after ${n} tensors`)
  return out
}
