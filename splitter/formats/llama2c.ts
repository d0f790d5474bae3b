/**
 * llama2.c checkpoints, legacy version-0 format (karpathy/llama2.c `run.c` `read_checkpoint`, export.py
 * `legacy_export`): a 28-byte header of 7 little-endian int32, then fp32 arrays, each matrix stored as `out` rows of
 * `in` values (run.c's matmul reads `w[i * n + j]`).
 */
import { ModelFormatError } from '../errors.ts'
import type { LlamaConfig, ModelDescription, TensorRef } from '../model.ts'
import { readFully, withModelFile } from './model-file.ts'

/** Bytes of the header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len (int32 each). */
export const LLAMA2C_HEADER_BYTES = 28

/** The 7 header fields as stored; `vocabSize` is negative when the classifier is stored separately. */
export interface Llama2cHeader {
  readonly dim: number
  readonly hiddenDim: number
  readonly nLayers: number
  readonly nHeads: number
  readonly nKvHeads: number
  readonly vocabSize: number
  readonly seqLen: number
}

/** Decodes the 7 int32 header fields from the first 28 bytes of `bytes` (little-endian). */
export function decodeLlama2cHeader(bytes: Uint8Array): Llama2cHeader {
  if (bytes.byteLength < LLAMA2C_HEADER_BYTES) {
    throw new RangeError(`cannot decode a llama2.c header from ${bytes.byteLength} bytes: needs 28`)
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, LLAMA2C_HEADER_BYTES)
  const field = (i: number): number => view.getInt32(i * 4, true)
  return {
    dim: field(0),
    hiddenDim: field(1),
    nLayers: field(2),
    nHeads: field(3),
    nKvHeads: field(4),
    vocabSize: field(5),
    seqLen: field(6),
  }
}

/** Renders the header as `dim=64 hidden_dim=172 ...` for error messages. */
export function formatLlama2cHeader(h: Llama2cHeader): string {
  return (
    `dim=${h.dim} hidden_dim=${h.hiddenDim} n_layers=${h.nLayers} n_heads=${h.nHeads} ` +
    `n_kv_heads=${h.nKvHeads} vocab_size=${h.vocabSize} seq_len=${h.seqLen}`
  )
}

/**
 * Why `h` cannot be a llama2.c header, or undefined when it is plausible: positive sizes within generous bounds,
 * `dim % n_heads == 0`, `n_heads % n_kv_heads == 0`, an even head size (RoPE rotates pairs).
 */
export function llama2cHeaderProblem(h: Llama2cHeader): string | undefined {
  const limits: [string, number, number][] = [
    ['dim', h.dim, 1 << 17],
    ['hidden_dim', h.hiddenDim, 1 << 20],
    ['n_layers', h.nLayers, 1 << 12],
    ['n_heads', h.nHeads, 1 << 12],
    ['n_kv_heads', h.nKvHeads, 1 << 12],
    ['|vocab_size|', Math.abs(h.vocabSize), 1 << 24],
    ['seq_len', h.seqLen, 1 << 24],
  ]
  for (const [field, value, max] of limits) {
    if (value <= 0 || value > max) return `${field} is ${value}, expected 1..${max}`
  }
  if (h.dim % h.nHeads !== 0) return `dim ${h.dim} is not a multiple of n_heads ${h.nHeads}`
  if (h.nHeads % h.nKvHeads !== 0) return `n_heads ${h.nHeads} is not a multiple of n_kv_heads ${h.nKvHeads}`
  if ((h.dim / h.nHeads) % 2 !== 0) return `head size ${h.dim / h.nHeads} is odd, RoPE needs pairs`
  return undefined
}

/** One array of the checkpoint in file order: the tensors it holds (one per layer, or one) and its size. */
interface Section {
  /** Canonical name, `{i}` replaced by the layer index; undefined for skipped arrays (freq_cis). */
  readonly name: string | undefined
  /** Shape of one tensor, outermost first. */
  readonly shape: readonly number[]
  /** How many tensors of `shape` follow each other (n_layers for per-layer weights). */
  readonly count: number
}

/** run.c `memory_map_weights` order. */
function sections(h: Llama2cHeader): Section[] {
  const vocab = Math.abs(h.vocabSize)
  const headDim = h.dim / h.nHeads
  const kvDim = h.nKvHeads * headDim
  const L = h.nLayers
  const list: Section[] = [
    { name: 'token_embd.weight', shape: [vocab, h.dim], count: 1 },
    { name: 'blk.{i}.attn_norm.weight', shape: [h.dim], count: L },
    { name: 'blk.{i}.attn_q.weight', shape: [h.nHeads * headDim, h.dim], count: L },
    { name: 'blk.{i}.attn_k.weight', shape: [kvDim, h.dim], count: L },
    { name: 'blk.{i}.attn_v.weight', shape: [kvDim, h.dim], count: L },
    { name: 'blk.{i}.attn_output.weight', shape: [h.dim, h.nHeads * headDim], count: L },
    { name: 'blk.{i}.ffn_norm.weight', shape: [h.dim], count: L },
    { name: 'blk.{i}.ffn_gate.weight', shape: [h.hiddenDim, h.dim], count: L }, // w1
    { name: 'blk.{i}.ffn_down.weight', shape: [h.dim, h.hiddenDim], count: L }, // w2
    { name: 'blk.{i}.ffn_up.weight', shape: [h.hiddenDim, h.dim], count: L }, // w3
    { name: 'output_norm.weight', shape: [h.dim], count: 1 },
    { name: undefined, shape: [h.seqLen, headDim / 2], count: 1 }, // freq_cis_real (unused by run.c)
    { name: undefined, shape: [h.seqLen, headDim / 2], count: 1 }, // freq_cis_imag (unused by run.c)
  ]
  if (h.vocabSize < 0) list.push({ name: 'output.weight', shape: [vocab, h.dim], count: 1 })
  return list
}

/** Exact size in bytes of a version-0 checkpoint with header `h` (header included). */
export function llama2cExpectedBytes(h: Llama2cHeader): number {
  let elements = 0
  for (const s of sections(h)) elements += s.count * s.shape.reduce((a, b) => a * b, 1)
  return LLAMA2C_HEADER_BYTES + elements * 4
}

/**
 * Describes a llama2.c version-0 checkpoint without reading its weights: reads the 28-byte header and the file size,
 * and returns tensors as offsets with canonical GGUF names (w1 → ffn_gate, w2 → ffn_down, w3 → ffn_up). With a
 * positive vocab_size the classifier is shared: `output.weight` has the offset of `token_embd.weight`.
 * Config: headDim = dim / n_heads, normEps 1e-5, ropeTheta 10000, ropeStyle 'adjacent' (run.c's constants).
 * Errors: ModelFormatError when the file is missing, shorter than the header, has an implausible header, or its
 * size differs from the size the header implies (truncated or trailing bytes).
 * Source: karpathy/llama2.c run.c (`Config`, `memory_map_weights`), export.py `legacy_export`.
 */
export function readLlama2c(path: string): ModelDescription {
  return withModelFile(path, ({ fd, sizeBytes }) => {
    if (sizeBytes < LLAMA2C_HEADER_BYTES) {
      throw new ModelFormatError(
        path,
        `file is ${sizeBytes} bytes, a llama2.c checkpoint needs at least ${LLAMA2C_HEADER_BYTES} (7 int32 header fields)`,
      )
    }
    const bytes = new Uint8Array(LLAMA2C_HEADER_BYTES)
    readFully(fd, bytes, LLAMA2C_HEADER_BYTES, 0)
    const header = decodeLlama2cHeader(bytes)
    const problem = llama2cHeaderProblem(header)
    if (problem !== undefined) {
      throw new ModelFormatError(
        path,
        `not a llama2.c checkpoint: header ${problem} (read ${formatLlama2cHeader(header)})`,
      )
    }
    const expectedBytes = llama2cExpectedBytes(header)
    if (sizeBytes !== expectedBytes) {
      const what = sizeBytes < expectedBytes ? 'truncated' : 'has trailing bytes'
      throw new ModelFormatError(
        path,
        `llama2.c checkpoint is ${what}: header (${formatLlama2cHeader(header)}) implies ${expectedBytes} bytes, ` +
          `file is ${sizeBytes} bytes`,
      )
    }
    return describe(path, header)
  })
}

/** Builds the description of a checkpoint whose header and size were validated. */
function describe(path: string, h: Llama2cHeader): ModelDescription {
  const tensors = new Map<string, TensorRef>()
  let offsetBytes = LLAMA2C_HEADER_BYTES
  for (const s of sections(h)) {
    const byteLength = s.shape.reduce((a, b) => a * b, 1) * 4
    for (let i = 0; i < s.count; i++) {
      if (s.name !== undefined) {
        const name = s.name.replace('{i}', String(i))
        tensors.set(name, { name, dtype: 'f32', shape: [...s.shape], offsetBytes, byteLength })
      }
      offsetBytes += byteLength
    }
  }
  if (h.vocabSize > 0) {
    const embd = tensors.get('token_embd.weight')!
    tensors.set('output.weight', { ...embd, name: 'output.weight' })
  }
  const config: LlamaConfig = {
    arch: 'llama',
    dim: h.dim,
    hiddenDim: h.hiddenDim,
    nLayers: h.nLayers,
    nHeads: h.nHeads,
    nKvHeads: h.nKvHeads,
    headDim: h.dim / h.nHeads,
    vocabSize: Math.abs(h.vocabSize),
    maxSeqLen: h.seqLen,
    normEps: 1e-5,
    ropeTheta: 10000,
    ropeStyle: 'adjacent',
  }
  return { path, format: 'llama2c', config, tensors }
}
