/**
 * The master's sentencepiece-style tokenizer, behaving exactly like llama2.c run.c (`encode`, `decode`,
 * `safe_printf`). Workers never see text or token ids.
 */
import { TokenizerFormatError, type Vocabulary } from '../../splitter/index.ts'

/** Options of `SpmTokenizer`. */
export interface SpmTokenizerOptions {
  /** Where the vocabulary came from (file path), used in error messages. Default 'vocabulary'. */
  readonly source?: string
}

/** Options of `SpmTokenizer.encode`. */
export interface EncodeOptions {
  /** Prepend the BOS id (run.c `bos` flag). Default true. */
  readonly bos?: boolean
  /** Append the EOS id (run.c `eos` flag). Default false. */
  readonly eos?: boolean
}

const SPM_SPACE = '\u2581' // '▁', sentencepiece's visible space; llama2.c's exporter writes ' ' instead
/** run.c starts the merge search at -1e10: pairs scoring lower never merge. */
const MIN_MERGE_SCORE = -1e10
const BYTE_PIECE = /^<0x([0-9A-Fa-f]{1,2})/ // what run.c's sscanf(piece, "<0x%02hhX>") accepts in practice

/**
 * Tokenizer over a `Vocabulary` (llama2.c tokenizer.bin or GGUF `tokenizer.ggml.*`, model `llama`).
 * Pieces are compared as UTF-8 bytes with U+2581 '▁' read as ' ', so both sources behave like llama2.c's tokenizer.
 * Byte-fallback ids are the ids of the `<0xNN>` pieces looked up in the vocabulary (run.c assumes byte + 3, which
 * holds for both stories260K vocabularies). When a piece occurs twice, lookups return the lower id (run.c's bsearch
 * would return either).
 * Errors (constructor): TokenizerFormatError when the vocabulary lacks the ' ' piece (dummy prefix) or any of the 256
 * `<0xNN>` byte pieces, or scores and tokens differ in length.
 * Source: karpathy/llama2.c run.c (`encode`, `decode`, `safe_printf`).
 * @example
 * const tok = new SpmTokenizer(readTokenizerBin('tok512.bin', 512))
 * tok.encode('Once upon a time') // [1, 403, 407, 261, 378]
 */
export class SpmTokenizer {
  readonly bosId: number
  readonly eosId: number
  readonly vocabSize: number
  /** UTF-8 bytes of each piece, '▁' → ' '. */
  readonly #pieces: Uint8Array[]
  /** Each piece's bytes as a latin1 string (one char per byte): concatenating keys concatenates bytes. */
  readonly #keys: string[]
  readonly #ids = new Map<string, number>()
  readonly #scores: Float32Array
  /** [256] token id of each byte-fallback piece `<0xNN>`. */
  readonly #byteIds = new Int32Array(256)
  readonly #spaceId: number

  constructor(vocab: Vocabulary, options: SpmTokenizerOptions = {}) {
    const source = options.source ?? 'vocabulary'
    if (vocab.scores.length !== vocab.tokens.length) {
      throw new TokenizerFormatError(
        source,
        `${vocab.tokens.length} tokens but ${vocab.scores.length} scores, expected one score per token`,
      )
    }
    this.bosId = vocab.bosId
    this.eosId = vocab.eosId
    this.vocabSize = vocab.tokens.length
    this.#scores = vocab.scores
    const utf8 = new TextEncoder()
    this.#pieces = vocab.tokens.map((t) => utf8.encode(t.replaceAll(SPM_SPACE, ' ')))
    this.#keys = this.#pieces.map(latin1)
    this.#keys.forEach((key, id) => {
      if (!this.#ids.has(key)) this.#ids.set(key, id)
    })
    const spaceId = this.#ids.get(' ')
    if (spaceId === undefined) {
      throw new TokenizerFormatError(source, "no ' ' (U+2581) piece, needed as the dummy prefix")
    }
    this.#spaceId = spaceId
    const missing: string[] = []
    for (let b = 0; b < 256; b++) {
      const piece = `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`
      const id = this.#ids.get(piece)
      if (id === undefined) missing.push(piece)
      else this.#byteIds[b] = id
    }
    if (missing.length > 0) {
      throw new TokenizerFormatError(
        source,
        `${missing.length} byte-fallback pieces are missing (first ${missing[0]}), expected all 256 <0xNN> pieces`,
      )
    }
  }

  /**
   * Token ids of `text` exactly as run.c `encode`: [BOS], the ' ' dummy prefix when the text is non-empty, one token
   * per UTF-8 code point (at most 4 bytes; unknown code points become one byte-fallback token per byte), then
   * repeatedly merge the leftmost adjacent pair with the highest score whose concatenation is a piece, [EOS].
   * A Uint8Array is taken as the raw bytes; like the C string, the text ends at its first NUL byte.
   */
  encode(text: string | Uint8Array, options: EncodeOptions = {}): number[] {
    let bytes = typeof text === 'string' ? new TextEncoder().encode(text) : text
    const nul = bytes.indexOf(0)
    if (nul >= 0) bytes = bytes.subarray(0, nul)

    const tokens: number[] = []
    if (options.bos ?? true) tokens.push(this.bosId)
    if (bytes.length > 0) tokens.push(this.#spaceId)

    let start = 0 // start of the current code point in `bytes`
    for (let i = 0; i < bytes.length; i++) {
      if ((bytes[i]! & 0xc0) !== 0x80) start = i
      const next = i + 1 < bytes.length ? bytes[i + 1]! : 0
      if ((next & 0xc0) === 0x80 && i + 1 - start < 4) continue
      const id = this.#ids.get(latin1(bytes.subarray(start, i + 1)))
      if (id !== undefined) {
        tokens.push(id)
      } else {
        for (let k = start; k <= i; k++) tokens.push(this.#byteIds[bytes[k]!]!)
      }
      start = i + 1
    }

    // Merge the best pair until none is in the vocabulary (BOS takes part, as in run.c). Each pair's merge result is
    // cached and only the neighbours of a merge are looked up again; the scan order and the strict '>' keep run.c's
    // choice (highest score, leftmost on ties).
    const pairIds: number[] = [] // [tokens.length - 1] id of tokens[i] + tokens[i + 1], or -1
    for (let i = 0; i + 1 < tokens.length; i++) pairIds.push(this.#merge(tokens[i]!, tokens[i + 1]!))
    for (;;) {
      let bestScore = MIN_MERGE_SCORE
      let bestIdx = -1
      for (let i = 0; i < pairIds.length; i++) {
        const id = pairIds[i]!
        if (id !== -1 && this.#scores[id]! > bestScore) {
          bestScore = this.#scores[id]!
          bestIdx = i
        }
      }
      if (bestIdx === -1) break
      const merged = pairIds[bestIdx]!
      tokens.splice(bestIdx, 2, merged)
      pairIds.splice(bestIdx, 1)
      if (bestIdx > 0) pairIds[bestIdx - 1] = this.#merge(tokens[bestIdx - 1]!, merged)
      if (bestIdx < pairIds.length) pairIds[bestIdx] = this.#merge(merged, tokens[bestIdx + 1]!)
    }

    if (options.eos ?? false) tokens.push(this.eosId)
    return tokens
  }

  /**
   * The bytes run.c `decode(prevToken, token)` yields: the piece, without its leading space when `prevToken` is BOS,
   * and a `<0xNN>` piece replaced by the single raw byte NN. Multi-byte UTF-8 characters may span several tokens,
   * hence bytes, not strings.
   * Errors: RangeError for an id outside the vocabulary.
   */
  pieceBytes(prevToken: number, token: number): Uint8Array {
    let piece = this.#piece(token)
    if (prevToken === this.bosId && piece[0] === 0x20) piece = piece.subarray(1)
    const byte = BYTE_PIECE.exec(latin1(piece))
    if (byte !== null) return Uint8Array.of(Number.parseInt(byte[1]!, 16))
    return piece
  }

  /**
   * What run.c prints for `token` after `prevToken` (`safe_printf(decode(prev, token))`): `pieceBytes` cut at its first
   * NUL (printf `%s`), and nothing for a single byte that is neither printable ASCII nor whitespace (control bytes,
   * and bytes >= 0x80 in the C locale).
   */
  printedBytes(prevToken: number, token: number): Uint8Array {
    let piece = this.pieceBytes(prevToken, token)
    const nul = piece.indexOf(0)
    if (nul >= 0) piece = piece.subarray(0, nul)
    if (piece.length === 1 && !isPrintOrSpace(piece[0]!)) return new Uint8Array(0)
    return piece
  }

  /** Id of the piece spelled `left` + `right`, or -1 (run.c: sprintf "%s%s" then str_lookup). */
  #merge(left: number, right: number): number {
    return this.#ids.get(this.#keys[left]! + this.#keys[right]!) ?? -1
  }

  #piece(token: number): Uint8Array {
    const piece = this.#pieces[token]
    if (piece === undefined || !Number.isInteger(token)) {
      throw new RangeError(`cannot decode token ${token}: vocabulary has ids 0..${this.vocabSize - 1}`)
    }
    return piece
  }
}

/** Bytes as a string of one char per byte. */
function latin1(bytes: Uint8Array): string {
  let s = ''
  for (const b of bytes) s += String.fromCharCode(b)
  return s
}

/** C-locale `isprint(b) || isspace(b)`. */
function isPrintOrSpace(b: number): boolean {
  return (b >= 0x20 && b <= 0x7e) || (b >= 0x09 && b <= 0x0d)
}
