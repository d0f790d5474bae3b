/**
 * Hugging Face model folders: config.json + model.safetensors (or model.safetensors.index.json + shards) +
 * tokenizer.json (+ tokenizer_config.json), for Llama, Mistral and Qwen2 causal LMs.
 */
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { ModelFormatError, TokenizerFormatError } from '../errors.ts'
import type { LlamaConfig, ModelDescription, TensorRef } from '../model.ts'
import { checkTensorShapes } from './canonical-tensors.ts'
import { readSafetensorsHeader, type SafetensorsHeader } from './safetensors.ts'

/** config.json `architectures` this reader understands, and the arch each maps to. */
const ARCHITECTURES: ReadonlyMap<string, 'llama' | 'qwen2'> = new Map([
  ['LlamaForCausalLM', 'llama'],
  ['MistralForCausalLM', 'llama'],
  ['Qwen2ForCausalLM', 'qwen2'],
])

/** HF parameter name → canonical (GGUF) name; `{i}` is the layer. */
const LAYER_NAMES: readonly [string, string][] = [
  ['input_layernorm.weight', 'attn_norm.weight'],
  ['self_attn.q_proj.weight', 'attn_q.weight'],
  ['self_attn.k_proj.weight', 'attn_k.weight'],
  ['self_attn.v_proj.weight', 'attn_v.weight'],
  ['self_attn.q_proj.bias', 'attn_q.bias'],
  ['self_attn.k_proj.bias', 'attn_k.bias'],
  ['self_attn.v_proj.bias', 'attn_v.bias'],
  ['self_attn.o_proj.weight', 'attn_output.weight'],
  ['post_attention_layernorm.weight', 'ffn_norm.weight'],
  ['mlp.gate_proj.weight', 'ffn_gate.weight'],
  ['mlp.up_proj.weight', 'ffn_up.weight'],
  ['mlp.down_proj.weight', 'ffn_down.weight'],
]
const GLOBAL_NAMES: ReadonlyMap<string, string> = new Map([
  ['model.embed_tokens.weight', 'token_embd.weight'],
  ['model.norm.weight', 'output_norm.weight'],
  ['lm_head.weight', 'output.weight'],
])

/**
 * The canonical name of a HF Llama/Qwen2 parameter (`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight`), or
 * undefined for parameters the model does not use (e.g. `rotary_emb.inv_freq`).
 */
export function canonicalTensorName(hfName: string): string | undefined {
  const global = GLOBAL_NAMES.get(hfName)
  if (global !== undefined) return global
  const m = /^model\.layers\.(\d+)\.(.+)$/.exec(hfName)
  if (m === null) return undefined
  const local = LAYER_NAMES.find(([hf]) => hf === m[2])
  return local === undefined ? undefined : `blk.${Number(m[1])}.${local[1]}`
}

/** The HF name of a canonical tensor, for messages (`blk.3.ffn_up.weight` → `model.layers.3.mlp.up_proj.weight`). */
export function hfTensorName(canonical: string): string {
  for (const [hf, name] of GLOBAL_NAMES) if (name === canonical) return hf
  const m = /^blk\.(\d+)\.(.+)$/.exec(canonical)
  const local = m === null ? undefined : LAYER_NAMES.find(([, name]) => name === m[2])
  return local === undefined || m === null ? canonical : `model.layers.${m[1]}.${local[0]}`
}

/**
 * Describes the Hugging Face model folder `dir` without reading weights.
 * - config.json: `architectures[0]` LlamaForCausalLM / MistralForCausalLM (arch 'llama') or Qwen2ForCausalLM ('qwen2',
 *   qkvBias); `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`
 *   (default heads), `max_position_embeddings`, `rms_norm_eps`, `rope_theta` (default 10000), `vocab_size`,
 *   `tie_word_embeddings` (default false), `head_dim` (default hidden / heads), `attention_bias` (Llama with Q/K/V
 *   biases). ropeStyle is 'halves': HF stores Q/K rows permuted for rotate-half RoPE, so no un-permutation is needed.
 * - weights: `model.safetensors`, else `model.safetensors.index.json` (`weight_map`: name → shard file); F32, F16,
 *   BF16. HF names map to the canonical ones (`canonicalTensorName`); every tensor carries its `file`, and
 *   `ModelDescription.path` is `dir`. Tied embeddings (or no `lm_head.weight` with `tie_word_embeddings`) point
 *   `output.weight` at the embedding.
 * - tokenizer.json → `tokenizerJson` (must exist and be a JSON object with a `model`); tokenizer_config.json (optional)
 *   → `bosId` / `eosId` (its `bos_token` / `eos_token` looked up in tokenizer.json's added_tokens, then its vocab;
 *   else config.json's `bos_token_id` / `eos_token_id`) and `chatTemplate` (`chat_template`).
 * Errors: ModelFormatError naming the file (and tensor, offset): missing config.json keys or weights, unsupported
 * architecture or `rope_scaling`, any safetensors error (`readSafetensorsHeader`), a shard named by the index that is
 * missing or lacks a tensor, canonical tensors missing or of the wrong shape; TokenizerFormatError naming the file:
 * missing or malformed tokenizer.json, malformed tokenizer_config.json, a bos/eos token not in the vocabulary.
 * Source: transformers modeling_llama.py / modeling_qwen2.py, configuration_llama.py; safetensors README.
 */
export function readHfFolder(dir: string): ModelDescription {
  const configPath = join(dir, 'config.json')
  const cfg = readJsonObject(configPath, ModelFormatError)
  const config = readConfig(configPath, cfg)

  const headers = readWeights(dir)
  const tensors = new Map<string, TensorRef>()
  for (const header of headers) {
    for (const t of header.tensors.values()) {
      const name = canonicalTensorName(t.name)
      if (name === undefined) continue
      if (tensors.has(name)) throw new ModelFormatError(header.path, `tensor ${t.name} appears in two files`)
      tensors.set(name, {
        name,
        dtype: t.dtype,
        shape: t.shape,
        offsetBytes: t.offsetBytes,
        byteLength: t.byteLength,
        file: header.path,
      })
    }
  }
  const embd = tensors.get('token_embd.weight')
  if (cfg.tie_word_embeddings === true && embd !== undefined) {
    // transformers ties lm_head to the embedding, even when a checkpoint also stores lm_head.weight.
    tensors.set('output.weight', { ...embd, name: 'output.weight' })
  }
  const weightsLabel = headers.length === 1 ? headers[0]!.path : join(dir, 'model.safetensors.index.json')
  checkTensorShapes(weightsLabel, config, tensors, (name) => `${name} (${hfTensorName(name)})`)

  const tok = readTokenizerFiles(dir, cfg)
  return {
    path: dir,
    format: 'safetensors',
    config,
    tensors,
    tokenizerJson: tok.json,
    ...(tok.bosId !== undefined ? { bosId: tok.bosId } : {}),
    ...(tok.eosId !== undefined ? { eosId: tok.eosId } : {}),
    ...(tok.chatTemplate !== undefined ? { chatTemplate: tok.chatTemplate } : {}),
  }
}

type ErrorClass = typeof ModelFormatError | typeof TokenizerFormatError

/** Parses a JSON file that must hold an object; errors of class `E` name the file. */
function readJsonObject(path: string, E: ErrorClass): Record<string, unknown> {
  let text: string
  try {
    text = readFileSync(path, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException | undefined)?.code
    throw new E(path, code === 'ENOENT' ? 'no such file' : `cannot read (${code ?? String(err)})`, { cause: err })
  }
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch (err) {
    throw new E(path, `is not valid JSON: ${(err as Error).message}`, { cause: err })
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new E(path, 'is not a JSON object')
  return json as Record<string, unknown>
}

function readConfig(path: string, cfg: Record<string, unknown>): LlamaConfig {
  const fail = (detail: string): never => {
    throw new ModelFormatError(path, detail)
  }
  const architectures = cfg.architectures
  const archName = Array.isArray(architectures) ? architectures[0] : undefined
  const arch = typeof archName === 'string' ? ARCHITECTURES.get(archName) : undefined
  if (arch === undefined) {
    fail(
      `architectures is ${JSON.stringify(architectures ?? null)}, supported: ${[...ARCHITECTURES.keys()].join(', ')}`,
    )
  }
  const int = (key: string, fallback?: number): number => {
    const v = cfg[key] ?? fallback
    if (v === undefined) fail(`key ${key} is missing`)
    if (!Number.isSafeInteger(v) || (v as number) <= 0) fail(`key ${key} is ${JSON.stringify(v)}, expected a whole number > 0`)
    return v as number
  }
  const num = (key: string, fallback?: number): number => {
    const v = cfg[key] ?? fallback
    if (v === undefined) fail(`key ${key} is missing`)
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) fail(`key ${key} is ${JSON.stringify(v)}, expected a number > 0`)
    return v as number
  }
  const ropeScaling = cfg.rope_scaling
  if (ropeScaling !== undefined && ropeScaling !== null) {
    fail(`rope_scaling ${JSON.stringify(ropeScaling)} is not supported (only plain RoPE)`)
  }
  const dim = int('hidden_size')
  const nHeads = int('num_attention_heads')
  const nKvHeads = int('num_key_value_heads', nHeads)
  if (nHeads % nKvHeads !== 0) {
    fail(`num_attention_heads ${nHeads} is not a multiple of num_key_value_heads ${nKvHeads}`)
  }
  const headDim = int('head_dim', Math.floor(dim / nHeads))
  const config: LlamaConfig = {
    arch: arch!,
    dim,
    hiddenDim: int('intermediate_size'),
    nLayers: int('num_hidden_layers'),
    nHeads,
    nKvHeads,
    headDim,
    vocabSize: int('vocab_size'),
    maxSeqLen: int('max_position_embeddings'),
    normEps: num('rms_norm_eps'),
    ropeTheta: num('rope_theta', 10000),
    ropeStyle: 'halves',
  }
  return arch === 'qwen2' || cfg.attention_bias === true ? { ...config, qkvBias: true } : config
}

/** Headers of the weight files: model.safetensors, or every shard the index names. */
function readWeights(dir: string): SafetensorsHeader[] {
  const single = join(dir, 'model.safetensors')
  const indexPath = join(dir, 'model.safetensors.index.json')
  if (existsSync(single)) return [readSafetensorsHeader(single)]
  if (!existsSync(indexPath)) {
    throw new ModelFormatError(dir, 'has config.json but no weights: looked for model.safetensors and model.safetensors.index.json')
  }
  const index = readJsonObject(indexPath, ModelFormatError)
  const weightMap = index.weight_map
  if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) {
    throw new ModelFormatError(indexPath, 'has no weight_map object (tensor name → shard file)')
  }
  const shards = new Map<string, string[]>() // shard file → tensor names
  for (const [name, file] of Object.entries(weightMap as Record<string, unknown>)) {
    if (typeof file !== 'string' || file.includes('/') || file.includes('\\') || file === '..') {
      throw new ModelFormatError(indexPath, `weight_map of tensor ${name} is ${JSON.stringify(file)}, expected a file name in ${dir}`)
    }
    shards.set(file, [...(shards.get(file) ?? []), name])
  }
  const headers: SafetensorsHeader[] = []
  for (const [file, names] of shards) {
    const header = readSafetensorsHeader(join(dir, file))
    for (const name of names) {
      if (!header.tensors.has(name)) {
        throw new ModelFormatError(header.path, `has no tensor ${name}, which ${indexPath} places in it`)
      }
    }
    headers.push(header)
  }
  return headers
}

/** tokenizer.json (required) and tokenizer_config.json (optional): the document, special ids, chat template. */
function readTokenizerFiles(
  dir: string,
  cfg: Record<string, unknown>,
): { json: string; bosId?: number; eosId?: number; chatTemplate?: string } {
  const tokPath = join(dir, 'tokenizer.json')
  if (!existsSync(tokPath)) {
    throw new TokenizerFormatError(tokPath, 'no such file: a Hugging Face model folder needs its tokenizer.json')
  }
  const tok = readJsonObject(tokPath, TokenizerFormatError)
  const model = tok.model as { vocab?: unknown } | undefined
  if (typeof model !== 'object' || model === null || typeof model.vocab !== 'object' || model.vocab === null) {
    throw new TokenizerFormatError(tokPath, 'has no model.vocab object')
  }
  const vocab = model.vocab as Record<string, unknown>
  const added = Array.isArray(tok.added_tokens) ? (tok.added_tokens as { id?: unknown; content?: unknown }[]) : []
  const idOf = (content: string): number | undefined => {
    const a = added.find((t) => t.content === content)
    if (a !== undefined && typeof a.id === 'number') return a.id
    const v = Array.isArray(vocab) ? undefined : vocab[content]
    return typeof v === 'number' ? v : undefined
  }

  const tcPath = join(dir, 'tokenizer_config.json')
  const tc = existsSync(tcPath) ? readJsonObject(tcPath, TokenizerFormatError) : {}
  const special = (key: 'bos_token' | 'eos_token'): number | undefined => {
    const v = tc[key]
    const content = typeof v === 'string' ? v : typeof v === 'object' && v !== null ? (v as { content?: unknown }).content : undefined
    if (typeof content === 'string') {
      const id = idOf(content)
      if (id === undefined) {
        throw new TokenizerFormatError(tcPath, `${key} ${JSON.stringify(content)} is not in ${tokPath} (added_tokens or vocab)`)
      }
      return id
    }
    const fromConfig = cfg[`${key}_id`]
    if (typeof fromConfig === 'number') return fromConfig
    if (Array.isArray(fromConfig) && typeof fromConfig[0] === 'number') return fromConfig[0] // Llama 3.1: eos is a list
    return undefined
  }
  let chatTemplate: string | undefined
  const ct = tc.chat_template
  if (typeof ct === 'string') chatTemplate = ct
  else if (Array.isArray(ct)) {
    const named = ct as { name?: unknown; template?: unknown }[]
    const t = (named.find((x) => x.name === 'default') ?? named[0])?.template
    if (typeof t === 'string') chatTemplate = t
  }
  const bosId = special('bos_token')
  const eosId = special('eos_token')
  return {
    json: JSON.stringify(tok),
    ...(bosId !== undefined ? { bosId } : {}),
    ...(eosId !== undefined ? { eosId } : {}),
    ...(chatTemplate !== undefined ? { chatTemplate } : {}),
  }
}
