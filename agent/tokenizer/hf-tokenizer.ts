/**
 * The master's tokenizer for Hugging Face tokenizer.json documents (byte-level BPE as GPT-2 / Llama 3 / Qwen2, and
 * sentencepiece-style BPE with byte fallback as HF Llama 2), over @huggingface/tokenizers. Workers never see text or
 * token ids.
 */
import { Tokenizer } from '@huggingface/tokenizers'
import { TokenizerFormatError } from '../../splitter/index.ts'

/** Options of `HfTokenizer`. */
export interface HfTokenizerOptions {
  /** Where the document came from (file path), for error messages. Default 'tokenizer.json'. */
  readonly source?: string
  /** BOS id (default: the token the post-processor prepends, else −1 = none). */
  readonly bosId?: number
  /** EOS id (default −1 = none; generation then stops only at its token limit or on BOS). */
  readonly eosId?: number
}

/** How a piece's text maps to bytes: byte-level alphabet (GPT-2), or '▁' spaces with `<0xNN>` byte fallback. */
type PieceStyle = 'byte-level' | 'metaspace'

interface TokenizerDoc {
  model?: { type?: string; vocab?: unknown; byte_fallback?: boolean }
  added_tokens?: { id: number; content: string; special?: boolean }[]
  decoder?: DecoderDoc | null
  post_processor?: { type?: string; single?: { SpecialToken?: { id: string } }[] } | null
}
interface DecoderDoc {
  type?: string
  decoders?: DecoderDoc[]
  replacement?: string
  pattern?: { String?: string }
  content?: string
}

/**
 * GPT-2's byte ↔ unicode alphabet (openai/gpt-2 encoder.py `bytes_to_unicode`): printable latin-1 bytes map to
 * themselves, the other 68 bytes to U+0100.. in byte order. Returns char code → byte.
 */
function unicodeToBytes(): Map<number, number> {
  const printable: number[] = []
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b)
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b)
  for (let b = 0xae; b <= 0xff; b++) printable.push(b)
  const map = new Map<number, number>()
  for (const b of printable) map.set(b, b)
  let n = 0
  for (let b = 0; b < 256; b++) {
    if (!printable.includes(b)) map.set(256 + n++, b)
  }
  return map
}
const BYTE_LEVEL = unicodeToBytes()
const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/

/**
 * Tokenizer over a Hugging Face tokenizer.json document (`ModelDescription.tokenizerJson`).
 * `encode` runs @huggingface/tokenizers (normalizer, pre-tokenizer, BPE, post-processor: BOS first when the document's
 * post-processor adds one); `pieceBytes` / `printedBytes` map one token to the exact bytes it stands for, so
 * characters split over several tokens stream correctly:
 * - byte-level documents (decoder `ByteLevel`): each char of the piece through GPT-2's unicode → byte table;
 * - others (sentencepiece-style: decoders Replace '▁' → ' ', ByteFallback, Metaspace): '▁' → ' ', a `<0xNN>` piece
 *   → the byte NN, and the leading space dropped after BOS (as sentencepiece and llama2.c);
 * - added tokens: special ones (BOS, EOS, `<|im_end|>` …) print nothing, others print their content.
 * Errors (constructor): TokenizerFormatError naming `source` when the document is not JSON, has no model vocabulary,
 * or @huggingface/tokenizers refuses it.
 * Source: HF tokenizers `tokenizer.json` format; openai/gpt-2 encoder.py (`bytes_to_unicode`).
 * @example
 * const tok = new HfTokenizer(model.tokenizerJson!, { bosId: model.bosId, eosId: model.eosId })
 * tok.encode('Hello') // [128000, 9906] for Llama 3
 */
export class HfTokenizer {
  readonly bosId: number
  readonly eosId: number
  readonly vocabSize: number
  readonly #source: string
  readonly #tokenizer: Tokenizer
  /** [vocabSize] bytes of each token as printed (special added tokens: empty). */
  readonly #bytes: (Uint8Array | undefined)[] = []
  readonly #style: PieceStyle

  constructor(tokenizerJson: string, options: HfTokenizerOptions = {}) {
    const source = options.source ?? 'tokenizer.json'
    this.#source = source
    let doc: TokenizerDoc
    try {
      doc = JSON.parse(tokenizerJson) as TokenizerDoc
    } catch (err) {
      throw new TokenizerFormatError(source, `is not valid JSON: ${(err as Error).message}`, { cause: err })
    }
    if (typeof doc !== 'object' || doc === null || typeof doc.model?.vocab !== 'object' || doc.model.vocab === null) {
      throw new TokenizerFormatError(source, 'has no model.vocab: not a Hugging Face tokenizer.json')
    }
    const added = Array.isArray(doc.added_tokens) ? doc.added_tokens : []
    try {
      this.#tokenizer = new Tokenizer({ ...doc, added_tokens: added }, {})
    } catch (err) {
      throw new TokenizerFormatError(source, `@huggingface/tokenizers refused it: ${(err as Error).message}`, { cause: err })
    }
    this.#style = hasDecoder(doc.decoder, 'ByteLevel') ? 'byte-level' : 'metaspace'
    const replacement = metaspaceReplacement(doc.decoder)
    const utf8 = new TextEncoder()
    const vocab = doc.model.vocab
    const pieces: [string, number][] = Array.isArray(vocab)
      ? (vocab as [string, number][]).map(([piece], id) => [piece, id])
      : Object.entries(vocab as Record<string, number>)
    const byteFallback = doc.model.byte_fallback === true
    for (const [piece, id] of pieces) {
      if (this.#style === 'byte-level') {
        this.#bytes[id] = byteLevelBytes(piece, utf8)
      } else {
        const byte = byteFallback ? BYTE_PIECE.exec(piece) : null
        this.#bytes[id] = byte !== null ? Uint8Array.of(Number.parseInt(byte[1]!, 16)) : utf8.encode(piece.replaceAll(replacement, ' '))
      }
    }
    for (const t of added) this.#bytes[t.id] = t.special === true ? new Uint8Array(0) : utf8.encode(t.content)
    this.vocabSize = this.#bytes.length

    const templateBos = doc.post_processor?.type === 'TemplateProcessing' ? doc.post_processor.single?.[0]?.SpecialToken?.id : undefined
    const templateBosId = templateBos === undefined ? undefined : this.#tokenizer.token_to_id(templateBos)
    this.bosId = options.bosId ?? templateBosId ?? -1
    this.eosId = options.eosId ?? -1
  }

  /**
   * Token ids of `text`: BOS first when the document's post-processor adds one (and `bos` is not false: text rendered
   * by a chat template already holds its BOS), special tokens written in the text (e.g. `<|im_start|>`) as their ids.
   * Errors: TokenizerFormatError when a piece has no id (a vocabulary without the pieces its own BPE produces).
   */
  encode(text: string, options: { bos?: boolean } = {}): number[] {
    const { ids, tokens } = this.#tokenizer.encode(text, { add_special_tokens: options.bos ?? true })
    const bad = ids.findIndex((id: number | undefined) => id === undefined)
    if (bad >= 0) {
      throw new TokenizerFormatError(this.#source, `encoding produced piece ${JSON.stringify(tokens[bad])}, which has no id`)
    }
    return ids
  }

  /** Text of `ids` as the document's decoder renders it (special tokens included unless `skipSpecial`). */
  decode(ids: readonly number[], options: { skipSpecial?: boolean } = {}): string {
    if (ids.length === 0) return ''
    return this.#tokenizer.decode([...ids], { skip_special_tokens: options.skipSpecial ?? false, clean_up_tokenization_spaces: false })
  }

  /** Piece or added-token text of `id` as stored in the document (e.g. '<|begin_of_text|>', 'Ġthe'), or undefined. */
  idToToken(id: number): string | undefined {
    return this.#tokenizer.id_to_token(id)
  }

  /** Id of a piece or added token, or undefined. */
  tokenToId(piece: string): number | undefined {
    return this.#tokenizer.token_to_id(piece)
  }

  /**
   * The exact bytes token `token` stands for after `prevToken` (see the class comment); a multi-byte character split
   * over tokens yields its bytes piecewise. Errors: RangeError for an id outside the vocabulary.
   */
  pieceBytes(prevToken: number, token: number): Uint8Array {
    const bytes = Number.isInteger(token) ? this.#bytes[token] : undefined
    if (bytes === undefined) {
      throw new RangeError(`cannot decode token ${token}: vocabulary has ids 0..${this.vocabSize - 1}`)
    }
    if (this.#style === 'metaspace' && prevToken === this.bosId && bytes[0] === 0x20) return bytes.subarray(1)
    return bytes
  }

  /** What to print for `token` after `prevToken`: `pieceBytes` (no byte is dropped). */
  printedBytes(prevToken: number, token: number): Uint8Array {
    return this.pieceBytes(prevToken, token)
  }
}

/** True when the decoder (or a decoder of a Sequence) has type `type`. */
function hasDecoder(d: DecoderDoc | null | undefined, type: string): boolean {
  if (d === null || d === undefined) return false
  return d.type === type || (d.decoders ?? []).some((x) => hasDecoder(x, type))
}

/** The visible-space character of a sentencepiece-style decoder (Metaspace `replacement`, or Replace X → ' '). */
function metaspaceReplacement(d: DecoderDoc | null | undefined): string {
  if (d === null || d === undefined) return '\u2581'
  if (d.type === 'Metaspace' && typeof d.replacement === 'string') return d.replacement
  if (d.type === 'Replace' && d.content === ' ' && typeof d.pattern?.String === 'string') return d.pattern.String
  for (const x of d.decoders ?? []) {
    const r = metaspaceReplacement(x)
    if (r !== '\u2581') return r
  }
  return '\u2581'
}

/** Bytes of a byte-level piece; a char outside GPT-2's alphabet (not produced by HF's converters) as its UTF-8. */
function byteLevelBytes(piece: string, utf8: TextEncoder): Uint8Array {
  const out: number[] = []
  for (const ch of piece) {
    const b = BYTE_LEVEL.get(ch.codePointAt(0)!)
    if (b !== undefined) out.push(b)
    else out.push(...utf8.encode(ch))
  }
  return Uint8Array.from(out)
}
