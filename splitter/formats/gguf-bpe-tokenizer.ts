/**
 * Converts a GGUF byte-level BPE vocabulary (`tokenizer.ggml.model` = `gpt2`: GPT-2, Llama 3, Qwen2) into a Hugging Face
 * tokenizer.json document, the form the master's tokenizer reads (agent/tokenizer/hf-tokenizer.ts).
 */
import { ModelFormatError } from '../errors.ts'
import type { GgufValue } from './gguf.ts'

/** GPT-2's pre-tokenizer split (HF tokenizers `ByteLevel` with `use_regex`). */
export const GPT2_SPLIT_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
/** Llama 3's pre-tokenizer split (its tokenizer.json; llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`). */
export const LLAMA3_SPLIT_REGEX =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/** Qwen2's pre-tokenizer split (its tokenizer.json; llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`): digits one by one. */
export const QWEN2_SPLIT_REGEX =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/** `tokenizer.ggml.pre` values understood here (llama.cpp llama-vocab.cpp names) and their split regex. */
const PRE_TOKENIZERS: ReadonlyMap<string, { regex: string; llama3: boolean }> = new Map([
  ['default', { regex: GPT2_SPLIT_REGEX, llama3: false }],
  ['gpt-2', { regex: GPT2_SPLIT_REGEX, llama3: false }],
  ['gpt2', { regex: GPT2_SPLIT_REGEX, llama3: false }],
  ['llama3', { regex: LLAMA3_SPLIT_REGEX, llama3: true }],
  ['llama-v3', { regex: LLAMA3_SPLIT_REGEX, llama3: true }],
  ['llama-bpe', { regex: LLAMA3_SPLIT_REGEX, llama3: true }],
  ['qwen2', { regex: QWEN2_SPLIT_REGEX, llama3: false }],
  ['deepseek-r1-qwen', { regex: QWEN2_SPLIT_REGEX, llama3: false }],
])

/** GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`). */
const TOKEN_TYPE_CONTROL = 3
const TOKEN_TYPE_USER_DEFINED = 4

/**
 * A tokenizer.json document (HF tokenizers format) for a GGUF `gpt2` vocabulary:
 * - model BPE: `vocab` = `tokenizer.ggml.tokens` (id = index; a repeated piece keeps its first id), `merges` =
 *   `tokenizer.ggml.merges` ("left right" strings, written as [left, right] pairs), no unk token, `ignore_merges` for
 *   Llama 3 (as its own tokenizer.json);
 * - pre-tokenizer: a `Split` on the regex that `tokenizer.ggml.pre` names (`llama-bpe`/`llama3` → Llama 3,
 *   `qwen2` → Qwen2, `default`/`gpt-2` → GPT-2; absent → GPT-2), then `ByteLevel` without regex; decoder `ByteLevel`;
 * - added tokens: every id whose `tokenizer.ggml.token_type` is 3 (control) as a special token, 4 (user-defined) as a
 *   plain added token; their content is matched verbatim before BPE;
 * - post-processor: prepends BOS when `tokenizer.ggml.add_bos_token` says so (default: true for Llama 3, false
 *   otherwise, as llama.cpp) and `bosId` is known, else HF's `ByteLevel` (nothing added).
 * Errors: ModelFormatError naming `path` and the key: missing or malformed `tokenizer.ggml.merges`, a merge that is not
 * two pieces, an unknown `tokenizer.ggml.pre`, a `token_type` array of the wrong length.
 * Source: llama.cpp llama-vocab.cpp (`llm_tokenizer_bpe`), HF tokenizers `BPE` / `ByteLevel` serialisation.
 */
export function ggufBpeTokenizerJson(
  path: string,
  meta: ReadonlyMap<string, GgufValue>,
  tokens: readonly string[],
  bosId: number | undefined,
): string {
  const fail = (detail: string): never => {
    throw new ModelFormatError(path, detail)
  }
  const rawMerges = meta.get('tokenizer.ggml.merges')
  if (!Array.isArray(rawMerges) || rawMerges.some((m) => typeof m !== 'string')) {
    fail(
      rawMerges === undefined
        ? 'tokenizer.ggml.merges is missing, a "gpt2" (byte-level BPE) tokenizer needs its merges'
        : 'tokenizer.ggml.merges is not an array of strings',
    )
  }
  const merges: [string, string][] = (rawMerges as readonly string[]).map((m, i) => {
    const parts = m.split(' ')
    if (parts.length !== 2 || parts[0] === '' || parts[1] === '') {
      fail(`tokenizer.ggml.merges[${i}] is ${JSON.stringify(m)}, expected two pieces separated by one space`)
    }
    return [parts[0]!, parts[1]!]
  })

  const preValue = meta.get('tokenizer.ggml.pre')
  const preName = typeof preValue === 'string' ? preValue : 'default'
  const pre = PRE_TOKENIZERS.get(preName)
  if (pre === undefined) {
    fail(
      `tokenizer.ggml.pre is ${JSON.stringify(preName)}, supported: ${[...PRE_TOKENIZERS.keys()].join(', ')}`,
    )
  }

  const types = meta.get('tokenizer.ggml.token_type')
  if (types !== undefined && !(ArrayBuffer.isView(types) && (types as Int32Array).length === tokens.length)) {
    fail(`tokenizer.ggml.token_type is not an integer array of ${tokens.length} values (one per token)`)
  }
  const typeOf = (id: number): number => (types === undefined ? 1 : Number((types as Int32Array)[id]))
  const addedTokens: object[] = []
  const vocab: Record<string, number> = {}
  tokens.forEach((piece, id) => {
    if (!Object.hasOwn(vocab, piece)) vocab[piece] = id
    const type = typeOf(id)
    if (type === TOKEN_TYPE_CONTROL || type === TOKEN_TYPE_USER_DEFINED) {
      const special = type === TOKEN_TYPE_CONTROL
      addedTokens.push({ id, content: piece, single_word: false, lstrip: false, rstrip: false, normalized: !special, special })
    }
  })

  const addBosValue = meta.get('tokenizer.ggml.add_bos_token')
  const addBos = (typeof addBosValue === 'boolean' ? addBosValue : pre!.llama3) && bosId !== undefined
  const bos = bosId === undefined ? '' : tokens[bosId]!
  const postProcessor = addBos
    ? {
        type: 'TemplateProcessing',
        single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
        pair: [
          { SpecialToken: { id: bos, type_id: 0 } },
          { Sequence: { id: 'A', type_id: 0 } },
          { SpecialToken: { id: bos, type_id: 1 } },
          { Sequence: { id: 'B', type_id: 1 } },
        ],
        special_tokens: { [bos]: { id: bos, ids: [bosId], tokens: [bos] } },
      }
    : { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false }

  const doc = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: null,
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: pre!.regex }, behavior: 'Isolated', invert: false },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    post_processor: postProcessor,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: pre!.llama3,
      vocab,
      merges,
    },
  }
  return JSON.stringify(doc)
}
