/**
 * Test helper: a small byte-level BPE vocabulary (GPT-2 alphabet) in GGUF `tokenizer.ggml.*` form, and a tiny
 * `qwen2` GGUF model carrying it. Not a test file itself.
 */
import {
  buildGguf,
  type FixtureTensor,
  type Kv,
  kvBool,
  kvF32,
  kvI32s,
  kvString,
  kvStrings,
  kvU32,
} from './gguf-fixture.ts'

/** GPT-2 `bytes_to_unicode` (openai/gpt-2 encoder.py), written out independently of the code under test. */
export function bytesToUnicode(): string[] {
  const bs: number[] = []
  for (let b = '!'.charCodeAt(0); b <= '~'.charCodeAt(0); b++) bs.push(b)
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b)
  for (let b = 0xae; b <= 0xff; b++) bs.push(b)
  const cs = [...bs]
  let n = 0
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b)
      cs.push(256 + n++)
    }
  }
  const out: string[] = []
  bs.forEach((b, i) => {
    out[b] = String.fromCharCode(cs[i]!)
  })
  return out
}
const B2U = bytesToUnicode()

/** A piece in the byte-level alphabet: text as its UTF-8 bytes, or raw bytes. */
export function bl(piece: string | readonly number[]): string {
  const bytes = typeof piece === 'string' ? new TextEncoder().encode(piece) : piece
  return Array.from(bytes, (b) => B2U[b]!).join('')
}

/** Merges of the tiny vocabulary, in rank order (raw text / bytes on each side). */
const MERGES: [string | number[], string | number[]][] = [
  [' ', 't'],
  ['h', 'e'],
  [' t', 'he'],
  [[0xc3], [0xa9]], // é
  [[0xe4], [0xbd]], // the first two bytes of 你 (E4 BD A0): a token that is part of a character
  ['l', 'l'],
  [' ', 'w'],
  [[0xc3], [0xb6]], // ö
]
const concat = (a: string | number[], b: string | number[]): number[] => [
  ...(typeof a === 'string' ? new TextEncoder().encode(a) : a),
  ...(typeof b === 'string' ? new TextEncoder().encode(b) : b),
]

/** The special / added tokens at the end of the vocabulary with their GGUF token types (3 control, 4 user-defined). */
export const BYTE_LEVEL_SPECIALS: readonly [string, number][] = [
  ['<|endoftext|>', 3],
  ['<|im_start|>', 3],
  ['<|im_end|>', 3],
  ['<think>', 4],
]

/** The vocabulary: ids 0–255 the bytes 0–255, then one piece per merge, then the specials. */
export function byteLevelVocab(): { tokens: string[]; merges: string[]; types: number[] } {
  const tokens = Array.from({ length: 256 }, (_, b) => B2U[b]!)
  const merges: string[] = []
  for (const [a, b] of MERGES) {
    merges.push(`${bl(a)} ${bl(b)}`)
    tokens.push(bl(concat(a, b)))
  }
  const types = tokens.map(() => 1)
  for (const [content, type] of BYTE_LEVEL_SPECIALS) {
    tokens.push(content)
    types.push(type)
  }
  return { tokens, merges, types }
}

/** ChatML, as Qwen2's tokenizer_config.json (reduced to the message loop and the generation prompt). */
export const CHATML_TEMPLATE =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

/** Shape of the tiny qwen2 model: dim 32 (one Q block per row), hidden 64, 1 layer, 4 heads, 2 KV heads of 8. */
export const QWEN_TINY = { dim: 32, hiddenDim: 64, nLayers: 1, nHeads: 4, nKvHeads: 2, headDim: 8 } as const

/** `tokenizer.ggml.*` keys of the byte-level vocabulary (`pre` and `addBos` as given; undefined leaves the key out). */
export function byteLevelTokenizerKvs(options: { pre?: string; addBos?: boolean; bosId?: number; eosId?: number } = {}): Kv[] {
  const { tokens, merges, types } = byteLevelVocab()
  const id = (content: string) => tokens.indexOf(content)
  const kvs = [
    kvString('tokenizer.ggml.model', 'gpt2'),
    kvStrings('tokenizer.ggml.tokens', tokens),
    kvI32s('tokenizer.ggml.token_type', types),
    kvStrings('tokenizer.ggml.merges', merges),
    kvU32('tokenizer.ggml.bos_token_id', options.bosId ?? id('<|endoftext|>')),
    kvU32('tokenizer.ggml.eos_token_id', options.eosId ?? id('<|im_end|>')),
    kvString('tokenizer.chat_template', CHATML_TEMPLATE),
  ]
  if (options.pre !== undefined) kvs.push(kvString('tokenizer.ggml.pre', options.pre))
  if (options.addBos !== undefined) kvs.push(kvBool('tokenizer.ggml.add_bos_token', options.addBos))
  return kvs
}

/** Deterministic bytes standing for tensor data (any bytes make valid f16 scales except NaN patterns: avoided). */
function filler(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n)
  for (let i = 0; i < n; i++) out[i] = (seed * 31 + i * 7) & 0x3f
  return out
}

/**
 * A tiny `qwen2` GGUF: `qwen2.*` keys, Q/K/V biases, the byte-level vocabulary, and tensors of mixed types
 * (F32 embedding and norms, Q8_0 ffn_gate, Q4_0 ffn_up, BF16 attn_output, F16 ffn_down, F32 projections/biases).
 * `override` may replace the type or dims of one tensor.
 */
export function buildTinyQwen2(
  options: { tokenizerKvs?: Kv[]; override?: { name: string; ggmlType?: number; dims?: number[] } } = {},
): Uint8Array {
  const { dim, hiddenDim, nHeads, nKvHeads, headDim } = QWEN_TINY
  const vocab = byteLevelVocab().tokens.length
  const kvs: Kv[] = [
    kvString('general.architecture', 'qwen2'),
    kvU32('qwen2.embedding_length', dim),
    kvU32('qwen2.feed_forward_length', hiddenDim),
    kvU32('qwen2.block_count', 1),
    kvU32('qwen2.attention.head_count', nHeads),
    kvU32('qwen2.attention.head_count_kv', nKvHeads),
    kvU32('qwen2.context_length', 64),
    kvF32('qwen2.attention.layer_norm_rms_epsilon', 1e-6),
    kvF32('qwen2.rope.freq_base', 1000000),
    ...(options.tokenizerKvs ?? byteLevelTokenizerKvs({ pre: 'qwen2', addBos: false })),
  ]
  // [name, shape outermost first, ggml type]
  const specs: [string, number[], number][] = [
    ['token_embd.weight', [vocab, dim], 0],
    ['output_norm.weight', [dim], 0],
    ['blk.0.attn_norm.weight', [dim], 0],
    ['blk.0.attn_q.weight', [nHeads * headDim, dim], 0],
    ['blk.0.attn_q.bias', [nHeads * headDim], 0],
    ['blk.0.attn_k.weight', [nKvHeads * headDim, dim], 0],
    ['blk.0.attn_k.bias', [nKvHeads * headDim], 0],
    ['blk.0.attn_v.weight', [nKvHeads * headDim, dim], 0],
    ['blk.0.attn_v.bias', [nKvHeads * headDim], 0],
    ['blk.0.attn_output.weight', [dim, nHeads * headDim], 30],
    ['blk.0.ffn_norm.weight', [dim], 0],
    ['blk.0.ffn_gate.weight', [hiddenDim, dim], 8],
    ['blk.0.ffn_up.weight', [hiddenDim, dim], 2],
    ['blk.0.ffn_down.weight', [dim, hiddenDim], 1],
  ]
  const tensors: FixtureTensor[] = specs.map(([name, shape, type], t) => {
    const o = options.override?.name === name ? options.override : undefined
    const ggmlType = o?.ggmlType ?? type
    const dims = o?.dims ?? [...shape].reverse()
    const count = dims.reduce((a, b) => a * b, 1)
    const bytes =
      ggmlType === 0 ? count * 4
      : ggmlType === 8 ? (count / 32) * 34
      : ggmlType === 2 ? (count / 32) * 18
      : ggmlType === 1 || ggmlType === 30 ? count * 2
      : 64
    return { name, dims, ggmlType, data: filler(Math.ceil(bytes), t) }
  })
  return buildGguf({ kvs, tensors })
}
