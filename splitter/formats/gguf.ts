/**
 * GGUF files (ggml/docs/gguf.md, versions 2 and 3, little-endian): header, metadata key/values, tensor infos, then
 * the tensor data section aligned to `general.alignment` (default 32). Only the header is read; tensors stay offsets.
 */
import { ModelFormatError } from '../errors.ts'
import type { DType, LlamaConfig, ModelDescription, TensorRef, Vocabulary } from '../model.ts'
import { checkTensorShapes } from './canonical-tensors.ts'
import { QK, tensorBytes } from '../quant/ggml-blocks.ts'
import { ggufBpeTokenizerJson } from './gguf-bpe-tokenizer.ts'
import { readFully, withModelFile } from './model-file.ts'
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

/** A GGUF array value: numeric arrays as typed arrays (64-bit integers as BigInt arrays), others as JS arrays. */
export type GgufArray =
  | Uint8Array
  | Int8Array
  | Uint16Array
  | Int16Array
  | Uint32Array
  | Int32Array
  | Float32Array
  | Float64Array
  | BigUint64Array
  | BigInt64Array
  | readonly boolean[]
  | readonly string[]
  | readonly GgufArray[]

/** A GGUF metadata value: 8–32-bit integers and floats as number, 64-bit integers as bigint. */
export type GgufValue = number | bigint | boolean | string | GgufArray

/** One tensor info as stored: `dims` innermost first (`ne[0]` is contiguous), offset relative to the data section. */
export interface GgufTensorInfo {
  readonly name: string
  readonly dims: readonly number[]
  /** ggml type id (0 = F32, 1 = F16, 2 = Q4_0, ...); see `ggmlTypeName`. */
  readonly ggmlType: number
  /** Offset from the start of the data section, bytes. */
  readonly relOffsetBytes: number
}

/** Everything before the tensor data of a GGUF file. */
export interface GgufHeader {
  readonly path: string
  readonly version: number
  readonly metadata: ReadonlyMap<string, GgufValue>
  readonly tensorInfos: readonly GgufTensorInfo[]
  /** `general.alignment` or 32, bytes. */
  readonly alignment: number
  /** Absolute offset of the data section (end of the tensor infos rounded up to `alignment`), bytes. */
  readonly dataOffsetBytes: number
  readonly fileBytes: number
}

/** ggml type names by id (ggml.h `enum ggml_type`; 4, 5, 31–33, 36–38 are removed types). */
const GGML_TYPE_NAMES: Readonly<Record<number, string>> = {
  0: 'F32',
  1: 'F16',
  2: 'Q4_0',
  3: 'Q4_1',
  4: 'Q4_2',
  5: 'Q4_3',
  6: 'Q5_0',
  7: 'Q5_1',
  8: 'Q8_0',
  9: 'Q8_1',
  10: 'Q2_K',
  11: 'Q3_K',
  12: 'Q4_K',
  13: 'Q5_K',
  14: 'Q6_K',
  15: 'Q8_K',
  16: 'IQ2_XXS',
  17: 'IQ2_XS',
  18: 'IQ3_XXS',
  19: 'IQ1_S',
  20: 'IQ4_NL',
  21: 'IQ3_S',
  22: 'IQ2_S',
  23: 'IQ4_XS',
  24: 'I8',
  25: 'I16',
  26: 'I32',
  27: 'I64',
  28: 'F64',
  29: 'IQ1_M',
  30: 'BF16',
  31: 'Q4_0_4_4',
  32: 'Q4_0_4_8',
  33: 'Q4_0_8_8',
  34: 'TQ1_0',
  35: 'TQ2_0',
  36: 'IQ4_NL_4_4',
  37: 'IQ4_NL_4_8',
  38: 'IQ4_NL_8_8',
  39: 'MXFP4',
}

/** Name of a ggml type id, e.g. `ggmlTypeName(2) === 'Q4_0'`; `unknown` for ids this reader does not know. */
export function ggmlTypeName(ggmlType: number): string {
  return GGML_TYPE_NAMES[ggmlType] ?? 'unknown'
}

/** Supported tensor element types: ggml id → dtype (sizes from `tensorBytes`: blocks of 32 for the Q types). */
const SUPPORTED: ReadonlyMap<number, DType> = new Map([
  [0, 'f32'],
  [1, 'f16'],
  [30, 'bf16'],
  [8, 'q8_0'],
  [2, 'q4_0'],
])
const SUPPORTED_NAMES = 'F32, F16, BF16, Q8_0, Q4_0'

const GGUF_MAGIC = 0x46554747 // 'GGUF' read as little-endian uint32
const DEFAULT_ALIGNMENT = 32
/** Initial header read; grows by doubling (real vocabularies make headers of several MB). */
const INITIAL_READ_BYTES = 1 << 16

/** Smallest encoded size of one value of each type, bytes (string: its u64 length). Used to bound array counts. */
const MIN_VALUE_BYTES: Readonly<Record<number, number>> = {
  [T_UINT8]: 1,
  [T_INT8]: 1,
  [T_UINT16]: 2,
  [T_INT16]: 2,
  [T_UINT32]: 4,
  [T_INT32]: 4,
  [T_FLOAT32]: 4,
  [T_BOOL]: 1,
  [T_STRING]: 8,
  [T_ARRAY]: 12,
  [T_UINT64]: 8,
  [T_INT64]: 8,
  [T_FLOAT64]: 8,
}

/**
 * Sequential little-endian reader over the start of a file, reading more of it (positional reads into a growing
 * buffer) only when the parser gets there. `context` names what is being parsed, for error messages.
 */
class HeaderCursor {
  readonly #path: string
  readonly #fd: number
  readonly fileBytes: number
  #buf: Uint8Array
  #view: DataView
  #filled = 0
  pos = 0
  context = 'header'
  readonly #utf8 = new TextDecoder('utf-8')

  constructor(path: string, fd: number, fileBytes: number) {
    this.#path = path
    this.#fd = fd
    this.fileBytes = fileBytes
    this.#buf = new Uint8Array(Math.min(INITIAL_READ_BYTES, fileBytes))
    this.#view = new DataView(this.#buf.buffer)
  }

  /** Makes bytes [pos, pos + n) available or throws a truncation error. */
  ensure(n: number): void {
    const end = this.pos + n
    if (end <= this.#filled) return
    if (end > this.fileBytes) {
      throw new ModelFormatError(
        this.#path,
        `GGUF header is truncated: reading ${this.context} needs bytes up to ${end}, file is ${this.fileBytes} bytes`,
      )
    }
    if (end > this.#buf.byteLength) {
      const size = Math.min(this.fileBytes, Math.max(end, this.#buf.byteLength * 2))
      const grown = new Uint8Array(size)
      grown.set(this.#buf.subarray(0, this.#filled))
      this.#buf = grown
      this.#view = new DataView(grown.buffer)
    }
    const want = this.#buf.byteLength - this.#filled
    const got = readFully(this.#fd, this.#buf.subarray(this.#filled), want, this.#filled)
    this.#filled += got
    if (end > this.#filled) {
      throw new ModelFormatError(this.#path, `file shrank while reading ${this.context}`)
    }
  }

  u8(): number {
    this.ensure(1)
    return this.#view.getUint8(this.pos++)
  }
  u32(): number {
    this.ensure(4)
    const v = this.#view.getUint32(this.pos, true)
    this.pos += 4
    return v
  }
  u64(): bigint {
    this.ensure(8)
    const v = this.#view.getBigUint64(this.pos, true)
    this.pos += 8
    return v
  }
  /** A u64 that must fit a JS safe integer (counts, lengths, offsets). */
  size(what: string): number {
    const v = this.u64()
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ModelFormatError(this.#path, `${what} while reading ${this.context} is ${v}, too large`)
    }
    return Number(v)
  }
  /** gguf_string_t: u64 length + UTF-8 bytes. */
  string(): string {
    const n = this.size('string length')
    this.ensure(n)
    const s = this.#utf8.decode(this.#buf.subarray(this.pos, this.pos + n))
    this.pos += n
    return s
  }
  /** Reads one metadata value of type `type`. */
  value(type: number): GgufValue {
    this.ensure(MIN_VALUE_BYTES[type] ?? 0)
    const v = this.#view
    const p = this.pos
    switch (type) {
      case T_UINT8:
        this.pos += 1
        return v.getUint8(p)
      case T_INT8:
        this.pos += 1
        return v.getInt8(p)
      case T_UINT16:
        this.pos += 2
        return v.getUint16(p, true)
      case T_INT16:
        this.pos += 2
        return v.getInt16(p, true)
      case T_UINT32:
        this.pos += 4
        return v.getUint32(p, true)
      case T_INT32:
        this.pos += 4
        return v.getInt32(p, true)
      case T_FLOAT32:
        this.pos += 4
        return v.getFloat32(p, true)
      case T_BOOL:
        this.pos += 1
        return v.getUint8(p) !== 0
      case T_STRING:
        return this.string()
      case T_ARRAY:
        return this.array()
      case T_UINT64:
        this.pos += 8
        return v.getBigUint64(p, true)
      case T_INT64:
        this.pos += 8
        return v.getBigInt64(p, true)
      case T_FLOAT64:
        this.pos += 8
        return v.getFloat64(p, true)
      default:
        throw new ModelFormatError(
          this.#path,
          `unknown GGUF metadata value type ${type} while reading ${this.context}, expected 0..12`,
        )
    }
  }
  /** gguf array: u32 element type, u64 count, elements. */
  array(): GgufArray {
    const type = this.u32()
    const count = this.size('array length')
    const minBytes = MIN_VALUE_BYTES[type]
    if (minBytes === undefined) {
      throw new ModelFormatError(
        this.#path,
        `unknown GGUF array element type ${type} while reading ${this.context}, expected 0..12`,
      )
    }
    this.ensure(count * minBytes) // bounds the count before allocating
    const fixed = <T extends { [i: number]: number | bigint }>(
      make: (n: number) => T,
      bytes: number,
      get: (p: number) => number | bigint,
    ): T => {
      const out = make(count)
      for (let i = 0; i < count; i++) out[i] = get(this.pos + i * bytes) as T[number]
      this.pos += count * bytes
      return out
    }
    const v = this.#view
    switch (type) {
      case T_UINT8:
        return fixed((n) => new Uint8Array(n), 1, (p) => v.getUint8(p))
      case T_INT8:
        return fixed((n) => new Int8Array(n), 1, (p) => v.getInt8(p))
      case T_UINT16:
        return fixed((n) => new Uint16Array(n), 2, (p) => v.getUint16(p, true))
      case T_INT16:
        return fixed((n) => new Int16Array(n), 2, (p) => v.getInt16(p, true))
      case T_UINT32:
        return fixed((n) => new Uint32Array(n), 4, (p) => v.getUint32(p, true))
      case T_INT32:
        return fixed((n) => new Int32Array(n), 4, (p) => v.getInt32(p, true))
      case T_FLOAT32:
        return fixed((n) => new Float32Array(n), 4, (p) => v.getFloat32(p, true))
      case T_UINT64:
        return fixed((n) => new BigUint64Array(n), 8, (p) => v.getBigUint64(p, true))
      case T_INT64:
        return fixed((n) => new BigInt64Array(n), 8, (p) => v.getBigInt64(p, true))
      case T_FLOAT64:
        return fixed((n) => new Float64Array(n), 8, (p) => v.getFloat64(p, true))
      case T_BOOL: {
        const out: boolean[] = []
        for (let i = 0; i < count; i++) out.push(v.getUint8(this.pos + i) !== 0)
        this.pos += count
        return out
      }
      case T_STRING: {
        const out: string[] = []
        for (let i = 0; i < count; i++) out.push(this.string())
        return out
      }
      default: {
        const out: GgufArray[] = []
        for (let i = 0; i < count; i++) out.push(this.array())
        return out
      }
    }
  }
}

/**
 * Parses everything before the tensor data of a GGUF v2/v3 file: version, metadata (all value types, arrays
 * included), tensor infos, alignment and the data section offset. Reads the file from its start with positional reads
 * into a growing buffer and stops at the end of the tensor infos (tensor data is never read).
 * Errors: ModelFormatError for a missing file, bad magic, an unsupported version (1, big-endian), a truncated header,
 * an unknown value type, or a bad `general.alignment`.
 * Source: ggml docs/gguf.md.
 */
export function readGgufMetadata(path: string): GgufHeader {
  return withModelFile(path, ({ fd, sizeBytes }) => {
    const c = new HeaderCursor(path, fd, sizeBytes)
    c.context = 'the magic'
    const magic = c.u32()
    if (magic !== GGUF_MAGIC) {
      throw new ModelFormatError(path, `expected GGUF magic "GGUF", found bytes ${hex32(magic)}`)
    }
    c.context = 'the version'
    const version = c.u32()
    if (version !== 2 && version !== 3) {
      // A big-endian file stores 3 as bytes 00 00 00 03, which reads here as 0x03000000.
      const detail =
        version !== 0 && (version & 0xffff) === 0
          ? `GGUF version field reads ${version} (a big-endian GGUF?), supported: little-endian versions 2 and 3`
          : `GGUF version is ${version}, supported: 2, 3`
      throw new ModelFormatError(path, detail)
    }
    c.context = 'the tensor count'
    const nTensors = c.size('tensor count')
    c.context = 'the metadata count'
    const nKv = c.size('metadata count')

    const metadata = new Map<string, GgufValue>()
    for (let i = 0; i < nKv; i++) {
      c.context = `metadata key ${i} of ${nKv}`
      const key = c.string()
      c.context = `metadata value "${key}"`
      const type = c.u32()
      metadata.set(key, c.value(type))
    }

    const tensorInfos: GgufTensorInfo[] = []
    for (let i = 0; i < nTensors; i++) {
      c.context = `tensor info ${i} of ${nTensors}`
      const name = c.string()
      c.context = `tensor info "${name}"`
      const nDims = c.u32()
      if (nDims < 1 || nDims > 4) {
        throw new ModelFormatError(path, `tensor ${name} has ${nDims} dimensions, GGUF allows 1..4`)
      }
      const dims: number[] = []
      for (let d = 0; d < nDims; d++) dims.push(c.size(`dimension ${d}`))
      const ggmlType = c.u32()
      const relOffsetBytes = c.size('tensor offset')
      tensorInfos.push({ name, dims, ggmlType, relOffsetBytes })
    }

    const alignmentValue = metadata.get('general.alignment') ?? DEFAULT_ALIGNMENT
    const alignment = typeof alignmentValue === 'bigint' ? Number(alignmentValue) : alignmentValue
    if (typeof alignment !== 'number' || !Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
      throw new ModelFormatError(path, `general.alignment is ${String(alignmentValue)}, expected a power of two`)
    }
    const dataOffsetBytes = Math.ceil(c.pos / alignment) * alignment
    return { path, version, metadata, tensorInfos, alignment, dataOffsetBytes, fileBytes: sizeBytes }
  })
}

/**
 * Describes a GGUF v2/v3 model of architecture `llama` or `qwen2`, without reading tensor data.
 * Tensor types: F32, F16, BF16, Q8_0 and Q4_0 (byte sizes from the ggml block sizes, 32 weights per Q block along the
 * innermost dimension, which must be a multiple of 32). Tensor dims are reversed into `shape` (outermost first);
 * offsets are absolute. A missing `output.weight` means tied embeddings: it then points at `token_embd.weight`. Every
 * canonical tensor must be present with the shape the config implies.
 * Config keys (`<arch>` = `llama` or `qwen2`): `<arch>.embedding_length`, `.feed_forward_length`, `.block_count`,
 * `.attention.head_count`, `.attention.head_count_kv` (default head_count), `.context_length`,
 * `.attention.layer_norm_rms_epsilon`, `.rope.freq_base` (default 10000), `.attention.key_length` /
 * `.rope.dimension_count` (head size, default dim / heads); vocabSize = length of `tokenizer.ggml.tokens` (else rows
 * of `token_embd.weight`). `llama`: ropeStyle 'adjacent' (GGUF `llama` stores Q/K un-permuted for pairwise RoPE).
 * `qwen2`: ropeStyle 'halves' (NEOX), qkvBias, tensors `blk.N.attn_{q,k,v}.bias`.
 * Tokenizer (`tokenizer.ggml.model`): `llama` (sentencepiece) → `vocab` from `tokenizer.ggml.{tokens,scores}`,
 * pieces kept verbatim (spaces as U+2581 '▁'); `gpt2` (byte-level BPE) → `tokenizerJson`, a Hugging Face
 * tokenizer.json document (see `ggufBpeTokenizerJson`). `bosId` / `eosId` from `tokenizer.ggml.{bos,eos}_token_id`,
 * `chatTemplate` from `tokenizer.chat_template`.
 * Errors: ModelFormatError naming the key or tensor: unsupported architecture, tokenizer model or ggml type
 * (e.g. `tensor blk.0.attn_q.weight has GGML type 12 (Q4_K), supported: F32, F16, BF16, Q8_0, Q4_0`), a Q-type tensor
 * whose innermost dimension is not a multiple of 32, tensor bytes outside the file, missing keys or tensors, shapes
 * that disagree with the config. Source: ggml docs/gguf.md, llama.cpp llama-model.cpp, llama-vocab.cpp.
 */
export function readGguf(path: string): ModelDescription {
  const header = readGgufMetadata(path)
  const meta = header.metadata
  const fail = (detail: string): never => {
    throw new ModelFormatError(path, detail)
  }

  const arch = meta.get('general.architecture')
  if (arch !== 'llama' && arch !== 'qwen2') {
    fail(
      arch === undefined
        ? 'GGUF has no general.architecture, supported: llama, qwen2'
        : `GGUF architecture is ${describeValue(arch)}, supported: llama, qwen2`,
    )
  }
  const archName = arch as 'llama' | 'qwen2'

  const tensors = new Map<string, TensorRef>()
  for (const info of header.tensorInfos) {
    const dtype = SUPPORTED.get(info.ggmlType)
    if (dtype === undefined) {
      fail(
        `tensor ${info.name} has GGML type ${info.ggmlType} (${ggmlTypeName(info.ggmlType)}), ` +
          `supported: ${SUPPORTED_NAMES}`,
      )
    }
    const offsetBytes = header.dataOffsetBytes + info.relOffsetBytes
    if (info.relOffsetBytes % header.alignment !== 0) {
      fail(`tensor ${info.name} has offset ${info.relOffsetBytes}, not a multiple of the alignment ${header.alignment}`)
    }
    const shape = [...info.dims].reverse()
    if ((dtype === 'q8_0' || dtype === 'q4_0') && (info.dims[0] ?? 0) % QK !== 0) {
      fail(
        `tensor ${info.name} at offset ${offsetBytes} is ${ggmlTypeName(info.ggmlType)} with innermost dimension ` +
          `${info.dims[0]}, not a multiple of the block size ${QK}`,
      )
    }
    const byteLength = tensorBytes(dtype!, shape)
    if (offsetBytes + byteLength > header.fileBytes) {
      fail(
        `tensor ${info.name} (${byteLength} bytes at offset ${offsetBytes}) ends at byte ${offsetBytes + byteLength}, ` +
          `past the end of the file (${header.fileBytes} bytes): the file is truncated`,
      )
    }
    if (tensors.has(info.name)) fail(`tensor ${info.name} appears twice`)
    tensors.set(info.name, { name: info.name, dtype: dtype!, shape, offsetBytes, byteLength })
  }

  const tokenizer = readTokenizer(path, meta)
  const config = readConfig(path, archName, meta, tokenizer.nTokens, tensors)
  const embd = tensors.get('token_embd.weight')
  if (!tensors.has('output.weight') && embd !== undefined) {
    tensors.set('output.weight', { ...embd, name: 'output.weight' })
  }
  checkTensorShapes(path, config, tensors)
  const chatTemplate = meta.get('tokenizer.chat_template')
  return {
    path,
    format: 'gguf',
    config,
    tensors,
    ...(tokenizer.vocab !== undefined ? { vocab: tokenizer.vocab } : {}),
    ...(tokenizer.json !== undefined ? { tokenizerJson: tokenizer.json } : {}),
    ...(tokenizer.bosId !== undefined ? { bosId: tokenizer.bosId } : {}),
    ...(tokenizer.eosId !== undefined ? { eosId: tokenizer.eosId } : {}),
    ...(typeof chatTemplate === 'string' ? { chatTemplate } : {}),
  }
}

/** A metadata integer (any integer type, bigint included) as a number; `fallback` when absent. */
function intKey(path: string, meta: ReadonlyMap<string, GgufValue>, key: string, fallback?: number): number {
  const v = meta.get(key)
  if (v === undefined) {
    if (fallback === undefined) throw new ModelFormatError(path, `GGUF metadata ${key} is missing`)
    return fallback
  }
  const n = typeof v === 'bigint' ? Number(v) : v
  if (typeof n !== 'number' || !Number.isSafeInteger(n)) {
    throw new ModelFormatError(path, `GGUF metadata ${key} is ${describeValue(v)}, expected an integer`)
  }
  return n
}

/** A metadata float; `fallback` when absent. */
function floatKey(path: string, meta: ReadonlyMap<string, GgufValue>, key: string, fallback?: number): number {
  const v = meta.get(key)
  if (v === undefined) {
    if (fallback === undefined) throw new ModelFormatError(path, `GGUF metadata ${key} is missing`)
    return fallback
  }
  if (typeof v !== 'number') {
    throw new ModelFormatError(path, `GGUF metadata ${key} is ${describeValue(v)}, expected a number`)
  }
  return v
}

function readConfig(
  path: string,
  arch: 'llama' | 'qwen2',
  meta: ReadonlyMap<string, GgufValue>,
  nTokens: number | undefined,
  tensors: ReadonlyMap<string, TensorRef>,
): LlamaConfig {
  const dim = intKey(path, meta, `${arch}.embedding_length`)
  const nHeads = intKey(path, meta, `${arch}.attention.head_count`)
  const nKvHeads = intKey(path, meta, `${arch}.attention.head_count_kv`, nHeads)
  const positive: [string, number][] = [
    [`${arch}.embedding_length`, dim],
    [`${arch}.attention.head_count`, nHeads],
    [`${arch}.attention.head_count_kv`, nKvHeads],
  ]
  for (const [key, value] of positive) {
    if (value <= 0) throw new ModelFormatError(path, `GGUF metadata ${key} is ${value}, expected > 0`)
  }
  if (nHeads % nKvHeads !== 0) {
    throw new ModelFormatError(
      path,
      `${arch}.attention.head_count ${nHeads} is not a multiple of ${arch}.attention.head_count_kv ${nKvHeads}`,
    )
  }
  const ropeDims = intKey(path, meta, `${arch}.rope.dimension_count`, Math.floor(dim / nHeads))
  const headDim = intKey(path, meta, `${arch}.attention.key_length`, ropeDims)
  if (ropeDims !== headDim) {
    throw new ModelFormatError(
      path,
      `${arch}.rope.dimension_count is ${ropeDims} but the head size is ${headDim}: partial RoPE is not supported`,
    )
  }
  const embdRows = tensors.get('token_embd.weight')?.shape[0]
  const vocabSize = nTokens ?? embdRows
  if (vocabSize === undefined) {
    throw new ModelFormatError(path, 'GGUF has neither tokenizer.ggml.tokens nor token_embd.weight: vocabulary size unknown')
  }
  const config: LlamaConfig = {
    arch,
    dim,
    hiddenDim: intKey(path, meta, `${arch}.feed_forward_length`),
    nLayers: intKey(path, meta, `${arch}.block_count`),
    nHeads,
    nKvHeads,
    headDim,
    vocabSize,
    maxSeqLen: intKey(path, meta, `${arch}.context_length`),
    normEps: floatKey(path, meta, `${arch}.attention.layer_norm_rms_epsilon`),
    ropeTheta: floatKey(path, meta, `${arch}.rope.freq_base`, 10000),
    ropeStyle: arch === 'qwen2' ? 'halves' : 'adjacent',
  }
  return arch === 'qwen2' ? { ...config, qkvBias: true } : config
}

/** What `tokenizer.ggml.*` holds: a sentencepiece vocabulary or a tokenizer.json document, and the special ids. */
interface GgufTokenizer {
  readonly nTokens?: number
  readonly vocab?: Vocabulary
  readonly json?: string
  readonly bosId?: number
  readonly eosId?: number
}

/** The tokenizer in `tokenizer.ggml.*`; empty when the file has none. */
function readTokenizer(path: string, meta: ReadonlyMap<string, GgufValue>): GgufTokenizer {
  const model = meta.get('tokenizer.ggml.model')
  if (model === undefined) return {}
  if (model !== 'llama' && model !== 'gpt2') {
    throw new ModelFormatError(
      path,
      `tokenizer.ggml.model is ${describeValue(model)}, supported: "llama" (sentencepiece), "gpt2" (byte-level BPE)`,
    )
  }
  const tokens = meta.get('tokenizer.ggml.tokens')
  if (!Array.isArray(tokens) || tokens.some((t) => typeof t !== 'string')) {
    throw new ModelFormatError(path, `tokenizer.ggml.tokens is ${describeValue(tokens)}, expected an array of strings`)
  }
  const pieces = tokens as readonly string[]
  const specialId = (key: string, fallback: number | undefined): number | undefined => {
    if (!meta.has(key) && fallback === undefined) return undefined
    const id = intKey(path, meta, key, fallback)
    if (id < 0 || id >= pieces.length) throw new ModelFormatError(path, `${key} is ${id}, expected 0..${pieces.length - 1}`)
    return id
  }
  if (model === 'gpt2') {
    const bosId = specialId('tokenizer.ggml.bos_token_id', undefined)
    const eosId = specialId('tokenizer.ggml.eos_token_id', undefined)
    const json = ggufBpeTokenizerJson(path, meta, pieces, bosId)
    return {
      nTokens: pieces.length,
      json,
      ...(bosId !== undefined ? { bosId } : {}),
      ...(eosId !== undefined ? { eosId } : {}),
    }
  }
  const rawScores = meta.get('tokenizer.ggml.scores')
  let scores: Float32Array
  if (rawScores === undefined) {
    scores = new Float32Array(pieces.length) // llama.cpp treats missing scores as 0
  } else if (rawScores instanceof Float32Array && rawScores.length === pieces.length) {
    scores = rawScores
  } else {
    throw new ModelFormatError(
      path,
      `tokenizer.ggml.scores is ${describeValue(rawScores)}, expected ${pieces.length} float32 values (one per token)`,
    )
  }
  const bosId = specialId('tokenizer.ggml.bos_token_id', 1)!
  const eosId = specialId('tokenizer.ggml.eos_token_id', 2)!
  return { nTokens: pieces.length, vocab: { model: 'llama', tokens: pieces, scores, bosId, eosId }, bosId, eosId }
}

/** Short description of a metadata value for messages. */
function describeValue(v: GgufValue | undefined): string {
  if (v === undefined) return 'missing'
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)
  if (typeof v === 'number' || typeof v === 'bigint' || typeof v === 'boolean') return String(v)
  return `an array of ${v.length} ${v.constructor.name === 'Array' ? 'values' : v.constructor.name}`
}

function hex32(v: number): string {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24].map((b) => b.toString(16).padStart(2, '0')).join(' ')
}
