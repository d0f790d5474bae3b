/**
 * A made-up sentencepiece vocabulary of any size ≥ 448, enough for the master's tokenizer to encode any prompt:
 * `<unk>`, `<s>`, `</s>`, the 256 byte-fallback pieces `<0x00>`…`<0xFF>` (so every UTF-8 byte is representable),
 * then `▁`, every printable ASCII character, `▁` + each of them, and letter strings of growing length (with and
 * without `▁`) until the vocabulary is full.
 */
import type { Vocabulary } from '../model.ts'

const SPACE = '\u2581'
/** Fixed part: 3 specials + 256 bytes + '▁' + 94 printable + 94 '▁'-prefixed printable. */
export const MIN_SYNTH_VOCAB = 3 + 256 + 1 + 94 + 94

const LOWER = 'abcdefghijklmnopqrstuvwxyz'

/** Letter strings of length `n`, lexicographic (a…z). */
function* words(n: number): Generator<string> {
  if (n === 0) {
    yield ''
    return
  }
  for (const head of words(n - 1)) for (const c of LOWER) yield head + c
}

/**
 * The synthetic vocabulary of exactly `vocabSize` pieces (ids as listed above; BOS 1, EOS 2). Scores: 0 for specials
 * and bytes, then −(rank) so shorter, earlier pieces merge first, as in a trained BPE vocabulary. Deterministic.
 * Errors: RangeError when `vocabSize` < MIN_SYNTH_VOCAB (448).
 */
export function synthVocabulary(vocabSize: number): Vocabulary {
  if (!Number.isInteger(vocabSize) || vocabSize < MIN_SYNTH_VOCAB) {
    throw new RangeError(`cannot make a synthetic vocabulary of ${vocabSize} tokens: at least ${MIN_SYNTH_VOCAB}`)
  }
  const tokens: string[] = ['<unk>', '<s>', '</s>']
  for (let b = 0; b < 256; b++) tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`)
  const nFixed = tokens.length
  const printable: string[] = []
  for (let c = 0x21; c <= 0x7e; c++) printable.push(String.fromCharCode(c))
  tokens.push(SPACE, ...printable, ...printable.map((p) => SPACE + p))
  outer: for (let len = 2; ; len++) {
    for (const w of words(len)) {
      if (tokens.length >= vocabSize) break outer
      tokens.push(SPACE + w)
      if (tokens.length >= vocabSize) break outer
      tokens.push(w)
    }
  }
  const scores = new Float32Array(vocabSize)
  for (let id = nFixed; id < vocabSize; id++) scores[id] = -(id - nFixed)
  return { model: 'llama', tokens, scores, bosId: 1, eosId: 2 }
}
