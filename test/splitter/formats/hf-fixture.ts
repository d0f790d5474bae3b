/**
 * Test helper: writes Hugging Face model folders by hand (config.json, safetensors, tokenizer.json,
 * tokenizer_config.json), including one converted from stories260K.bin + tok512.bin the way transformers'
 * converters would have written it. Not a test file itself.
 */
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { readTokenizerBin } from '../../../agent/tokenizer/llama2c-tokenizer.ts'
import { readLlama2c } from '../../../splitter/formats/llama2c.ts'
import { readTensorF32 } from '../../../splitter/formats/read-tensor.ts'
import { f32ToBf16Bytes, f32ToF16Bytes } from '../../../splitter/quant/ggml-blocks.ts'

/** A tensor to store in a safetensors file: `data` is written verbatim. */
export interface StTensor {
  readonly name: string
  readonly dtype: string
  readonly shape: readonly number[]
  readonly data: Uint8Array
}

/**
 * Encodes a safetensors file: u64 header length, JSON header (padded with spaces to a multiple of 8, as the reference
 * writer does), then each tensor's bytes in order. `header` may rewrite the header object before it is written.
 */
export function buildSafetensors(
  tensors: readonly StTensor[],
  header: (h: Record<string, unknown>) => Record<string, unknown> = (h) => h,
): Uint8Array {
  const h: Record<string, unknown> = { __metadata__: { format: 'pt' } }
  let offset = 0
  for (const t of tensors) {
    h[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] }
    offset += t.data.byteLength
  }
  let json = JSON.stringify(header(h))
  while ((8 + json.length) % 8 !== 0) json += ' '
  const jsonBytes = new TextEncoder().encode(json)
  const out = new Uint8Array(8 + jsonBytes.byteLength + offset)
  new DataView(out.buffer).setBigUint64(0, BigInt(jsonBytes.byteLength), true)
  out.set(jsonBytes, 8)
  let pos = 8 + jsonBytes.byteLength
  for (const t of tensors) {
    out.set(t.data, pos)
    pos += t.data.byteLength
  }
  return out
}

/**
 * Rows of a Q or K projection ([nHeads·headDim, dim] f32) in Hugging Face's layout: within each head, the even
 * members of the RoPE pairs first, then the odd ones (the inverse of llama.cpp convert_hf_to_gguf.py `permute`:
 * `w.reshape(n_head, head_dim/2, 2, dim).swapaxes(1, 2).reshape(...)`), so rotate-half RoPE on the permuted rows
 * equals pairwise RoPE on the original ones.
 */
export function permuteForHf(w: Float32Array, nHeads: number, headDim: number, dim: number): Float32Array {
  const out = new Float32Array(w.length) // [nHeads·headDim, dim]
  const half = headDim / 2
  for (let h = 0; h < nHeads; h++) {
    for (let s = 0; s < 2; s++) {
      for (let j = 0; j < half; j++) {
        const from = h * headDim + 2 * j + s
        const to = h * headDim + s * half + j
        out.set(w.subarray(from * dim, (from + 1) * dim), to * dim)
      }
    }
  }
  return out
}

/** f32 values encoded as stored dtype `dtype`. */
export function encodeValues(values: Float32Array, dtype: 'F32' | 'F16' | 'BF16'): Uint8Array {
  if (dtype === 'F16') return f32ToF16Bytes(values)
  if (dtype === 'BF16') return f32ToBf16Bytes(values)
  return new Uint8Array(values.buffer.slice(values.byteOffset, values.byteOffset + values.byteLength))
}

/** HF name → canonical name pairs of one layer (the inverse of splitter/formats/hf-folder.ts). */
const LAYER: readonly [string, string][] = [
  ['input_layernorm.weight', 'attn_norm.weight'],
  ['self_attn.q_proj.weight', 'attn_q.weight'],
  ['self_attn.k_proj.weight', 'attn_k.weight'],
  ['self_attn.v_proj.weight', 'attn_v.weight'],
  ['self_attn.o_proj.weight', 'attn_output.weight'],
  ['post_attention_layernorm.weight', 'ffn_norm.weight'],
  ['mlp.gate_proj.weight', 'ffn_gate.weight'],
  ['mlp.up_proj.weight', 'ffn_up.weight'],
  ['mlp.down_proj.weight', 'ffn_down.weight'],
]

/** config.json of stories260K as transformers' LlamaConfig would write it. */
export const STORIES_HF_CONFIG = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 64,
  intermediate_size: 172,
  num_hidden_layers: 5,
  num_attention_heads: 8,
  num_key_value_heads: 4,
  max_position_embeddings: 512,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  vocab_size: 512,
  tie_word_embeddings: true,
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: 'silu',
  torch_dtype: 'float32',
}

/**
 * The tensors of stories260K.bin under HF names (Q/K rows permuted, no lm_head: the classifier is tied), stored as
 * `dtype`.
 */
export function storiesHfTensors(binPath: string, dtype: 'F32' | 'F16' | 'BF16'): StTensor[] {
  const model = readLlama2c(binPath)
  const { nLayers, nHeads, nKvHeads, headDim, dim } = model.config
  const out: StTensor[] = []
  const add = (hfName: string, canonical: string, transform?: (w: Float32Array) => Float32Array): void => {
    const ref = model.tensors.get(canonical)!
    let values = readTensorF32(model, canonical)
    if (transform) values = transform(values)
    out.push({ name: hfName, dtype, shape: ref.shape, data: encodeValues(values, dtype) })
  }
  add('model.embed_tokens.weight', 'token_embd.weight')
  for (let i = 0; i < nLayers; i++) {
    for (const [hf, canonical] of LAYER) {
      const transform =
        canonical === 'attn_q.weight'
          ? (w: Float32Array) => permuteForHf(w, nHeads, headDim, dim)
          : canonical === 'attn_k.weight'
            ? (w: Float32Array) => permuteForHf(w, nKvHeads, headDim, dim)
            : undefined
      add(`model.layers.${i}.${hf}`, `blk.${i}.${canonical}`, transform)
    }
  }
  add('model.norm.weight', 'output_norm.weight')
  return out
}

/**
 * A sentencepiece-style BPE tokenizer.json for a llama2.c vocabulary, as transformers' `LlamaConverter` writes one:
 * vocab = pieces with ' ' back to '▁' (ids 0–2 are `<unk>`, `<s>`, `</s>`), merges from `SentencePieceExtractor`
 * (every split of every piece into two vocabulary pieces, ordered by the merged piece's score, highest first, ties
 * in vocabulary order), byte fallback, normalizer Prepend('▁') + Replace(' ' → '▁'), post-processor `<s> $A`, decoder
 * Replace('▁' → ' ') + ByteFallback + Fuse + Strip(1 leading space).
 */
export function spmTokenizerJson(tokenizerBin: string, vocabSize: number): Record<string, unknown> {
  const bin = readTokenizerBin(tokenizerBin, vocabSize)
  const pieces = bin.tokens.map((t, id) => (id === 0 ? '<unk>' : id === 1 ? '<s>' : id === 2 ? '</s>' : t.replaceAll(' ', '\u2581')))
  const vocab: Record<string, number> = {}
  pieces.forEach((p, id) => {
    if (Object.hasOwn(vocab, p)) throw new Error(`piece ${JSON.stringify(p)} appears twice`)
    vocab[p] = id
  })
  // transformers convert_slow_tokenizer.py SentencePieceExtractor.extract(vocab_scores)
  const merges: { left: string; right: string; score: number }[] = []
  pieces.forEach((piece, id) => {
    const chars = Array.from(piece)
    const local: { left: string; right: string; score: number }[] = []
    for (let k = 1; k < chars.length; k++) {
      const left = chars.slice(0, k).join('')
      const right = chars.slice(k).join('')
      if (Object.hasOwn(vocab, left) && Object.hasOwn(vocab, right)) local.push({ left, right, score: bin.scores[id]! })
    }
    local.sort((a, b) => vocab[a.left]! - vocab[b.left]! || vocab[a.right]! - vocab[b.right]!)
    merges.push(...local)
  })
  merges.sort((a, b) => b.score - a.score) // stable: ties stay in vocabulary order
  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  })
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>')],
    normalizer: {
      type: 'Sequence',
      normalizers: [
        { type: 'Prepend', prepend: '\u2581' },
        { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: '<s>', type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: '<s>', type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '\u2581' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: merges.map((m) => [m.left, m.right]),
    },
  }
}

/** tokenizer_config.json of a Llama-2-style tokenizer. */
export const STORIES_TOKENIZER_CONFIG = {
  add_bos_token: true,
  add_eos_token: false,
  bos_token: { content: '<s>', lstrip: false, normalized: false, rstrip: false, single_word: false, __type: 'AddedToken' },
  eos_token: '</s>',
  unk_token: '<unk>',
  model_max_length: 512,
  tokenizer_class: 'LlamaTokenizer',
  legacy: false,
  chat_template: "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
}

/**
 * Writes stories260K as a Hugging Face folder into `dir`: config.json, tokenizer.json, tokenizer_config.json and the
 * weights as `dtype`, in one model.safetensors or (`shards: 2`) two shards with a model.safetensors.index.json.
 */
export function writeStoriesHfFolder(
  dir: string,
  paths: { bin: string; tokenizerBin: string },
  options: { dtype: 'F32' | 'F16' | 'BF16'; shards: 1 | 2 },
): string {
  mkdirSync(dir, { recursive: true })
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...STORIES_HF_CONFIG, torch_dtype: options.dtype }, null, 2))
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(spmTokenizerJson(paths.tokenizerBin, 512)))
  writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify(STORIES_TOKENIZER_CONFIG, null, 2))
  const tensors = storiesHfTensors(paths.bin, options.dtype)
  if (options.shards === 1) {
    writeFileSync(join(dir, 'model.safetensors'), buildSafetensors(tensors))
    return dir
  }
  const cut = Math.ceil(tensors.length / 2)
  const parts = [tensors.slice(0, cut), tensors.slice(cut)]
  const weightMap: Record<string, string> = {}
  parts.forEach((part, k) => {
    const file = `model-0000${k + 1}-of-00002.safetensors`
    writeFileSync(join(dir, file), buildSafetensors(part))
    for (const t of part) weightMap[t.name] = file
  })
  const totalSize = tensors.reduce((a, t) => a + t.data.byteLength, 0)
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2))
  return dir
}

/** config.json of the tiny HF model: dim 4, hidden 6, 1 layer, 2 heads, 1 KV head (head size 2), vocab 3. */
export const TINY_HF_CONFIG = {
  architectures: ['LlamaForCausalLM'],
  hidden_size: 4,
  intermediate_size: 6,
  num_hidden_layers: 1,
  num_attention_heads: 2,
  num_key_value_heads: 1,
  max_position_embeddings: 16,
  rms_norm_eps: 1e-6,
  rope_theta: 500000,
  vocab_size: 3,
  tie_word_embeddings: false,
}

/** The tiny model's tensors (F32, value = t·100 + k·0.5 for tensor number t, element k), in file order. */
export function tinyHfTensors(dtype: 'F32' | 'F16' | 'BF16' = 'F32'): StTensor[] {
  const specs: [string, number[]][] = [
    ['model.embed_tokens.weight', [3, 4]],
    ['model.layers.0.input_layernorm.weight', [4]],
    ['model.layers.0.self_attn.q_proj.weight', [4, 4]],
    ['model.layers.0.self_attn.k_proj.weight', [2, 4]],
    ['model.layers.0.self_attn.v_proj.weight', [2, 4]],
    ['model.layers.0.self_attn.o_proj.weight', [4, 4]],
    ['model.layers.0.post_attention_layernorm.weight', [4]],
    ['model.layers.0.mlp.gate_proj.weight', [6, 4]],
    ['model.layers.0.mlp.up_proj.weight', [6, 4]],
    ['model.layers.0.mlp.down_proj.weight', [4, 6]],
    ['model.norm.weight', [4]],
    ['lm_head.weight', [3, 4]],
  ]
  return specs.map(([name, shape], t) => {
    const n = shape.reduce((a, b) => a * b, 1)
    const values = Float32Array.from({ length: n }, (_, k) => t * 100 + k * 0.5)
    return { name, dtype, shape, data: encodeValues(values, dtype) }
  })
}

/** A minimal BPE tokenizer.json for the tiny model (3 special tokens, no merges). */
export const TINY_TOKENIZER_JSON = {
  version: '1.0',
  added_tokens: [
    { id: 0, content: '<unk>', special: true },
    { id: 1, content: '<s>', special: true },
    { id: 2, content: '</s>', special: true },
  ],
  normalizer: null,
  pre_tokenizer: null,
  post_processor: null,
  decoder: null,
  model: { type: 'BPE', unk_token: '<unk>', byte_fallback: false, vocab: { '<unk>': 0, '<s>': 1, '</s>': 2 }, merges: [] },
}

/**
 * Writes the tiny HF folder into `dir` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
 * `files` replaces or (with null) leaves out a file: `{ 'tokenizer.json': null }`, `{ 'model.safetensors': bytes }`.
 */
export function writeTinyHfFolder(dir: string, files: Record<string, string | Uint8Array | object | null> = {}): string {
  mkdirSync(dir, { recursive: true })
  const all: Record<string, string | Uint8Array | object | null> = {
    'config.json': TINY_HF_CONFIG,
    'model.safetensors': buildSafetensors(tinyHfTensors()),
    'tokenizer.json': TINY_TOKENIZER_JSON,
    'tokenizer_config.json': { bos_token: '<s>', eos_token: '</s>' },
    ...files,
  }
  for (const [name, content] of Object.entries(all)) {
    if (content === null) continue
    const data = content instanceof Uint8Array || typeof content === 'string' ? content : JSON.stringify(content)
    writeFileSync(join(dir, name), data)
  }
  return dir
}
