/**
 * Converting a loaded model (any format `loadModel` reads) into the metadata and streamed tensors of a GGUF file, as
 * llama.cpp's converters and `llama-quantize` would write it: `general.*`, `<arch>.*` hyper-parameters, the
 * tokenizer, and every tensor in the requested type (norms and biases stay F32).
 */
import { closeSync, openSync } from 'node:fs'
import { basename } from 'node:path'
import { ModelFormatError } from '../errors.ts'
import type { DType, LlamaConfig, ModelDescription, TensorRef, Vocabulary } from '../model.ts'
import { decodeToF32, encodeFromF32 } from '../quant/dtype-codec.ts'
import { QK, tensorBytes } from '../quant/ggml-blocks.ts'
import { canonicalShapes } from './canonical-tensors.ts'
import { type GgufValue, readGgufMetadata } from './gguf.ts'
import { type GgufTensorSpec, type GgufWriteValue, gguf } from './gguf-writer.ts'
import { readFully } from './model-file.ts'

/** Tensor types a GGUF export can be asked for. */
export type GgufExportType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_0'

/** llama.cpp `llama_ftype` of each export type, written as `general.file_type` (MOSTLY_Q4_0 = 2, MOSTLY_Q8_0 = 7). */
export const LLAMA_FILE_TYPES: Readonly<Record<GgufExportType, number>> = { f32: 0, f16: 1, q4_0: 2, q8_0: 7, bf16: 32 }

/** GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`). */
export const TOKEN_TYPE = { normal: 1, unknown: 2, control: 3, userDefined: 4, unused: 5, byte: 6 } as const

/** Values per converted chunk: rows are read, converted and handed to the writer about 4 MiB of f32 at a time. */
const CHUNK_VALUES = 1 << 20

/**
 * The stored type of one tensor, by llama.cpp's rule (llama-quant.cpp): tensors of fewer than 2 dimensions (norms,
 * biases) stay F32; others get `requested`; a q-type that does not fit (innermost dimension not a multiple of 32)
 * falls back to F16, the next type this exporter offers that stores any width. `fallback` then says why, in one line.
 */
export function chooseTensorType(
  name: string,
  shape: readonly number[],
  requested: GgufExportType,
): { dtype: DType; fallback?: string } {
  if (shape.length < 2) return { dtype: 'f32' }
  const inner = shape.at(-1)!
  if ((requested === 'q8_0' || requested === 'q4_0') && inner % QK !== 0) {
    return {
      dtype: 'f16',
      fallback:
        `${name} [${shape.join(', ')}]: innermost dimension ${inner} is not a multiple of ${QK}, ` +
        `stored as f16 instead of ${requested}`,
    }
  }
  return { dtype: requested }
}

/**
 * `<arch>.*` hyper-parameter keys of `config` as llama.cpp writes them (u32 sizes, f32 epsilon and RoPE base),
 * with `key_length` / `value_length` only when the head size is not dim / heads.
 */
export function ggufConfigMetadata(config: LlamaConfig): [string, GgufWriteValue][] {
  const a = config.arch
  const out: [string, GgufWriteValue][] = [
    [`${a}.vocab_size`, gguf.u32(config.vocabSize)],
    [`${a}.context_length`, gguf.u32(config.maxSeqLen)],
    [`${a}.embedding_length`, gguf.u32(config.dim)],
    [`${a}.feed_forward_length`, gguf.u32(config.hiddenDim)],
    [`${a}.block_count`, gguf.u32(config.nLayers)],
    [`${a}.attention.head_count`, gguf.u32(config.nHeads)],
    [`${a}.attention.head_count_kv`, gguf.u32(config.nKvHeads)],
    [`${a}.rope.dimension_count`, gguf.u32(config.headDim)],
    [`${a}.rope.freq_base`, gguf.f32(config.ropeTheta)],
    [`${a}.attention.layer_norm_rms_epsilon`, gguf.f32(config.normEps)],
  ]
  if (config.headDim * config.nHeads !== config.dim) {
    out.push([`${a}.attention.key_length`, gguf.u32(config.headDim)])
    out.push([`${a}.attention.value_length`, gguf.u32(config.headDim)])
  }
  return out
}

/**
 * `tokenizer.ggml.*` keys of a sentencepiece vocabulary (`tokenizer.ggml.model` = `llama`), normalised to what
 * llama.cpp writes: spaces as U+2581 '▁'; llama2.c's `\n<s>\n` / `\n</s>\n` pieces as `<s>` / `</s>`; token types
 * unknown (`<unk>`), control (BOS, EOS), byte (`<0xNN>`), else normal; `unknown_token_id` when there is a `<unk>`.
 */
export function ggufLlamaVocabMetadata(vocab: Vocabulary): [string, GgufWriteValue][] {
  const tokens = vocab.tokens.map((piece) => {
    const special = /^\n(<\/?s>)\n$/.exec(piece)
    return special ? special[1]! : piece.replaceAll(' ', '\u2581')
  })
  const types = new Int32Array(tokens.length)
  tokens.forEach((t, id) => {
    types[id] =
      t === '<unk>'
        ? TOKEN_TYPE.unknown
        : id === vocab.bosId || id === vocab.eosId
          ? TOKEN_TYPE.control
          : /^<0x[0-9A-Fa-f]{2}>$/.test(t)
            ? TOKEN_TYPE.byte
            : TOKEN_TYPE.normal
  })
  const out: [string, GgufWriteValue][] = [
    ['tokenizer.ggml.model', 'llama'],
    ['tokenizer.ggml.tokens', tokens],
    ['tokenizer.ggml.scores', Float32Array.from(vocab.scores)],
    ['tokenizer.ggml.token_type', types],
    ['tokenizer.ggml.bos_token_id', gguf.u32(vocab.bosId)],
    ['tokenizer.ggml.eos_token_id', gguf.u32(vocab.eosId)],
  ]
  const unk = tokens.indexOf('<unk>')
  if (unk >= 0) out.push(['tokenizer.ggml.unknown_token_id', gguf.u32(unk)])
  return out
}

/** The parts of a Hugging Face tokenizer.json this exporter reads. */
interface HfTokenizerJson {
  model?: {
    type?: string
    vocab?: Record<string, number>
    merges?: (string | [string, string])[]
    byte_fallback?: boolean
  }
  added_tokens?: { id: number; content: string; special?: boolean }[]
  normalizer?: unknown
  pre_tokenizer?: unknown
  post_processor?: { type?: string; single?: ({ SpecialToken?: { id: string } } | object)[] } | null
}

/**
 * Tokenizer keys of a Hugging Face tokenizer.json with a BPE model, as llama.cpp's converters write them.
 * - Sentencepiece-style BPE (Llama 1/2, Mistral, TinyLlama: byte fallback, or '▁' from a Metaspace pre-tokenizer or a
 *   Replace normalizer) → `llama` (`ggufLlamaVocabMetadata`): tokens by id; scores from the merges, −(rank of the first
 *   merge that produces the piece), so the highest-priority merge has the highest score as in the sentencepiece model
 *   (pieces no merge produces score below every merge; specials and bytes 0).
 * - Byte-level BPE (GPT-2, Llama 3, Qwen2) → `gpt2`: tokens by id (gaps as `[PAD<id>]`), merges as "left right", token
 *   types (special added tokens control, other added tokens user-defined), `pre` chosen by architecture and vocabulary
 *   size (`qwen2`, `llama-bpe` for 128256-token Llama 3 vocabularies, else `default`), BOS / EOS ids and
 *   `add_bos_token` from the post-processor; plus the whole document as `tokenizer.huggingface.json` (GGUF spec).
 * Errors: ModelFormatError naming `path` when the document is not JSON or not a BPE model.
 */
export function ggufBpeVocabMetadata(
  path: string,
  tokenizerJson: string,
  model: { arch: LlamaConfig['arch']; bosId?: number; eosId?: number },
): [string, GgufWriteValue][] {
  let doc: HfTokenizerJson
  try {
    doc = JSON.parse(tokenizerJson) as HfTokenizerJson
  } catch (err) {
    throw new ModelFormatError(path, 'tokenizer.json is not valid JSON', { cause: err })
  }
  const vocab = doc.model?.vocab
  if (doc.model?.type !== 'BPE' || vocab === undefined) {
    throw new ModelFormatError(
      path,
      `tokenizer.json model is ${doc.model?.type ?? 'missing'}, only BPE vocabularies convert to GGUF`,
    )
  }
  const byId = new Map<number, string>()
  for (const [piece, id] of Object.entries(vocab)) byId.set(id, piece)
  const added = doc.added_tokens ?? []
  for (const t of added) byId.set(t.id, t.content)
  const size = Math.max(-1, ...byId.keys()) + 1
  const tokens = Array.from({ length: size }, (_, id) => byId.get(id) ?? `[PAD${id}]`)
  const merges = (doc.model.merges ?? []).map((m) => (typeof m === 'string' ? m.split(' ') : m))

  const spaceMarker = JSON.stringify([doc.normalizer ?? null, doc.pre_tokenizer ?? null]).includes('\u2581')
  if (doc.model.byte_fallback === true || spaceMarker) {
    const rank = new Map<string, number>()
    merges.forEach(([left, right], r) => {
      const piece = `${left}${right}`
      if (!rank.has(piece)) rank.set(piece, r)
    })
    const special = new Set(added.filter((t) => t.special === true).map((t) => t.id))
    const scores = Float32Array.from(tokens, (piece, id) => {
      if (special.has(id) || /^<0x[0-9A-Fa-f]{2}>$/.test(piece)) return 0
      return -(rank.get(piece) ?? merges.length + id)
    })
    return ggufLlamaVocabMetadata({ model: 'llama', tokens, scores, bosId: model.bosId ?? 1, eosId: model.eosId ?? 2 })
  }

  const types = new Int32Array(size).fill(TOKEN_TYPE.normal)
  for (let id = 0; id < size; id++) if (!byId.has(id)) types[id] = TOKEN_TYPE.unused
  for (const t of added) types[t.id] = t.special === true ? TOKEN_TYPE.control : TOKEN_TYPE.userDefined
  const pre = model.arch === 'qwen2' ? 'qwen2' : size === 128256 ? 'llama-bpe' : 'default'
  const out: [string, GgufWriteValue][] = [
    ['tokenizer.ggml.model', 'gpt2'],
    ['tokenizer.ggml.pre', pre],
    ['tokenizer.ggml.tokens', tokens],
    ['tokenizer.ggml.token_type', types],
    ['tokenizer.ggml.merges', merges.map((m) => m.join(' '))],
  ]
  if (model.bosId !== undefined) out.push(['tokenizer.ggml.bos_token_id', gguf.u32(model.bosId)])
  if (model.eosId !== undefined) out.push(['tokenizer.ggml.eos_token_id', gguf.u32(model.eosId)])
  const firstSpecial = doc.post_processor?.single?.[0]
  const addsBos =
    model.bosId !== undefined &&
    firstSpecial !== undefined &&
    'SpecialToken' in firstSpecial &&
    firstSpecial.SpecialToken?.id === tokens[model.bosId]
  out.push(['tokenizer.ggml.add_bos_token', addsBos])
  out.push(['tokenizer.huggingface.json', tokenizerJson])
  return out
}

/** A GGUF metadata value as read, typed for writing again: integers u32 (i32 if negative), floats f32, bigints 64-bit. */
function retype(value: GgufValue): GgufWriteValue {
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) return gguf.f32(value)
    return value < 0 ? gguf.i32(value) : value <= 0xffffffff ? gguf.u32(value) : gguf.u64(value)
  }
  if (typeof value === 'bigint') return value < 0n ? gguf.i64(value) : gguf.u64(value)
  return value
}

/** Options of `planGgufExport`. */
export interface GgufExportOptions {
  /** Requested type of 2-D weights. */
  readonly type: GgufExportType
  /** A sentencepiece vocabulary for models without one (llama2.c checkpoints: their tokenizer.bin). */
  readonly vocab?: Vocabulary
  /** `general.name`; default: the source's `general.name`, else the input file name without extension. */
  readonly name?: string
}

/** What to write: metadata in order, tensors with their producers, and one-line notices (type fallbacks). */
export interface GgufExport {
  readonly metadata: [string, GgufWriteValue][]
  readonly tensors: GgufTensorSpec[]
  readonly notices: string[]
  /** True when the metadata carries a tokenizer (`tokenizer.ggml.model`). */
  readonly hasTokenizer: boolean
}

/**
 * Plans the GGUF file of `model` converted to `options.type`:
 * - metadata: `general.architecture` (`llama` / `qwen2`), `general.name`, `general.file_type` (llama.cpp ftype),
 *   `general.quantization_version` 2 for q-types, `<arch>.*` (`ggufConfigMetadata`), then the tokenizer: a GGUF source's
 *   `tokenizer.*` keys verbatim (sentencepiece or gpt2, chat template included); else `options.vocab ?? model.vocab`
 *   as a `llama` vocabulary; else `model.tokenizerJson` (`ggufBpeVocabMetadata`: `llama` or `gpt2`); then
 *   `tokenizer.chat_template` from `model.chatTemplate` when not copied already;
 * - tensors: the canonical ones in llama.cpp's order (embedding, output norm, output, then per block), then any others
 *   the model has; `output.weight` is left out when it shares `token_embd.weight`'s bytes (tied; readers tie it back);
 *   types by `chooseTensorType`; a tensor already in its target type is copied byte for byte, others are decoded to f32
 *   and re-encoded a chunk of rows at a time (`data()` opens the file when the writer gets there and closes it).
 * - A `llama` model whose RoPE style is 'halves' (Hugging Face layout) gets its Q/K rows permuted to the adjacent-pair
 *   layout GGUF `llama` implies (llama.cpp convert_hf_to_gguf.py `permute`).
 * Errors: ModelFormatError for a `qwen2` model with adjacent-pair RoPE (no GGUF layout for it), a tensor whose byte
 * length disagrees with its shape, or a source file that changed since loading.
 */
export function planGgufExport(model: ModelDescription, options: GgufExportOptions): GgufExport {
  const { config } = model
  if (config.arch === 'qwen2' && config.ropeStyle !== 'halves') {
    throw new ModelFormatError(model.path, 'a qwen2 model with adjacent-pair RoPE has no GGUF layout')
  }
  const source = model.format === 'gguf' ? readGgufMetadata(model.path).metadata : undefined
  const sourceName = source?.get('general.name')
  const name =
    options.name ?? (typeof sourceName === 'string' ? sourceName : basename(model.path).replace(/\.[^.]*$/, ''))
  const quantized = options.type === 'q8_0' || options.type === 'q4_0'
  const metadata: [string, GgufWriteValue][] = [
    ['general.architecture', config.arch],
    ['general.name', name],
    ['general.file_type', gguf.u32(LLAMA_FILE_TYPES[options.type])],
    ...(quantized ? ([['general.quantization_version', gguf.u32(2)]] as [string, GgufWriteValue][]) : []),
    ...ggufConfigMetadata(config),
  ]

  const sourceTokenizer = source === undefined ? [] : [...source].filter(([key]) => key.startsWith('tokenizer.'))
  const vocab = options.vocab ?? model.vocab
  if (sourceTokenizer.some(([key]) => key === 'tokenizer.ggml.model')) {
    for (const [key, value] of sourceTokenizer) metadata.push([key, retype(value)])
  } else if (vocab !== undefined) {
    metadata.push(...ggufLlamaVocabMetadata(vocab))
  } else if (model.tokenizerJson !== undefined) {
    metadata.push(
      ...ggufBpeVocabMetadata(model.path, model.tokenizerJson, {
        arch: config.arch,
        ...(model.bosId !== undefined ? { bosId: model.bosId } : {}),
        ...(model.eosId !== undefined ? { eosId: model.eosId } : {}),
      }),
    )
  }
  if (model.chatTemplate !== undefined && !metadata.some(([key]) => key === 'tokenizer.chat_template')) {
    metadata.push(['tokenizer.chat_template', model.chatTemplate])
  }

  const order = canonicalShapes(config).map(([n]) => n)
  const names = [...order.filter((n) => model.tensors.has(n)), ...[...model.tensors.keys()].filter((n) => !order.includes(n))]
  const embd = model.tensors.get('token_embd.weight')
  const notices: string[] = []
  const tensors: GgufTensorSpec[] = []
  for (const tensorName of names) {
    const ref = model.tensors.get(tensorName)!
    if (tensorName === 'output.weight' && embd !== undefined && sharesBytes(model, ref, embd)) continue
    const expected = tensorBytes(ref.dtype, ref.shape)
    if (ref.byteLength !== expected) {
      throw new ModelFormatError(
        model.path,
        `tensor ${tensorName} is ${ref.byteLength} bytes, its shape [${ref.shape.join(', ')}] of ${ref.dtype} needs ${expected}`,
      )
    }
    const { dtype, fallback } = chooseTensorType(tensorName, ref.shape, options.type)
    if (fallback !== undefined) notices.push(fallback)
    const headRows =
      config.arch === 'llama' && config.ropeStyle === 'halves' && /^blk\.\d+\.attn_[qk]\.(weight|bias)$/.test(tensorName)
        ? config.headDim
        : 0
    tensors.push({
      name: tensorName,
      dtype,
      shape: ref.shape,
      data: () => convertTensor(model, ref, dtype, headRows),
    })
  }
  return {
    metadata,
    tensors,
    notices,
    hasTokenizer: metadata.some(([key]) => key === 'tokenizer.ggml.model'),
  }
}

function sharesBytes(model: ModelDescription, a: TensorRef, b: TensorRef): boolean {
  return (a.file ?? model.path) === (b.file ?? model.path) && a.offsetBytes === b.offsetBytes && a.dtype === b.dtype
}

/**
 * The bytes of `ref` as `target`, chunk by chunk. `headRows` > 0 permutes rows within each group of `headRows`
 * (one attention head) from the halves layout to adjacent pairs: output row 2j + i = input row i·headRows/2 + j.
 */
function* convertTensor(model: ModelDescription, ref: TensorRef, target: DType, headRows: number): Generator<Uint8Array> {
  const path = ref.file ?? model.path
  const inner = ref.shape.at(-1) ?? 1
  const rows = ref.shape.length < 2 ? 1 : ref.byteLength / tensorBytes(ref.dtype, [inner])
  const rowBytes = tensorBytes(ref.dtype, [inner])
  const unit = headRows > 0 && ref.shape.length >= 2 ? headRows : 1 // rows that must be read together
  const chunkRows = Math.max(unit, Math.floor(CHUNK_VALUES / inner / unit) * unit)
  let fd: number
  try {
    fd = openSync(path, 'r')
  } catch (err) {
    throw new ModelFormatError(path, `cannot reopen to read tensor ${ref.name}`, { cause: err })
  }
  try {
    for (let row = 0; row < rows; row += chunkRows) {
      const n = Math.min(chunkRows, rows - row)
      const bytes = new Uint8Array(n * rowBytes)
      const got = readFully(fd, bytes, bytes.byteLength, ref.offsetBytes + row * rowBytes)
      if (got !== bytes.byteLength) {
        throw new ModelFormatError(
          path,
          `tensor ${ref.name} needs ${bytes.byteLength} bytes at offset ${ref.offsetBytes + row * rowBytes}, ` +
            `the file ends after ${got}: it changed since it was loaded`,
        )
      }
      if (ref.dtype === target && headRows === 0) {
        yield bytes
        continue
      }
      let values = decodeToF32(ref.dtype, bytes, n * inner) // [n, inner] f32
      if (headRows > 0) values = halvesToAdjacent(values, ref.shape.length >= 2 ? inner : 1, headRows)
      yield encodeFromF32(target, values)
    }
  } finally {
    closeSync(fd)
  }
}

/** [k·headRows, width] rows, per head: row i·headRows/2 + j → 2j + i (llama.cpp `permute`). */
function halvesToAdjacent(values: Float32Array, width: number, headRows: number): Float32Array {
  const out = new Float32Array(values.length)
  const half = headRows / 2
  const heads = values.length / width / headRows
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < 2; i++) {
      for (let j = 0; j < half; j++) {
        const src = (h * headRows + i * half + j) * width
        const dst = (h * headRows + 2 * j + i) * width
        out.set(values.subarray(src, src + width), dst)
      }
    }
  }
  return out
}
