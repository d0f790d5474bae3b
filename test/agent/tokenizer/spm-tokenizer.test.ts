import { readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { readTokenizerBin } from '../../../agent/tokenizer/llama2c-tokenizer.ts'
import { SpmTokenizer } from '../../../agent/tokenizer/spm-tokenizer.ts'
import { readGguf } from '../../../splitter/formats/gguf.ts'
import type { Vocabulary } from '../../../splitter/model.ts'
import { expectFormatError } from '../../splitter/formats/format-error.ts'
import { HAVE_MODELS, REFERENCE_JSON, SKIP_REASON, STORIES_GGUF, TOK512 } from '../../splitter/formats/models-dir.ts'

interface ReferenceCase {
  readonly prompt: string
  readonly steps: number
  readonly prompt_tokens: number[]
  readonly next_tokens: number[]
  readonly stdout: string
}

/** What run.c prints for a generation: pieces after the first token, relative to the previous one, until BOS, then '\n'. */
function printed(tok: SpmTokenizer, first: number, next: readonly number[]): Buffer {
  const parts: Uint8Array[] = []
  let prev = first
  for (const token of next) {
    if (token === 1) break
    parts.push(tok.printedBytes(prev, token))
    prev = token
  }
  parts.push(Uint8Array.of(0x0a))
  return Buffer.concat(parts)
}

if (!HAVE_MODELS) console.warn(SKIP_REASON)

describe.skipIf(!HAVE_MODELS)('SpmTokenizer against run.c on stories260K', () => {
  const cases = HAVE_MODELS ? (JSON.parse(readFileSync(REFERENCE_JSON, 'utf8')) as ReferenceCase[]) : []
  const vocabularies: [string, () => Vocabulary][] = [
    ['tok512.bin', () => readTokenizerBin(TOK512, 512)],
    ['stories260K.gguf', () => readGguf(STORIES_GGUF).vocab!],
  ]

  for (const [source, load] of vocabularies) {
    it(`encodes every reference prompt to prompt_tokens (vocabulary from ${source})`, () => {
      const tok = new SpmTokenizer(load(), { source })
      expect(cases.length).toBeGreaterThan(0)
      for (const c of cases) expect(tok.encode(c.prompt), JSON.stringify(c.prompt)).toEqual(c.prompt_tokens)
    })

    it(`prints exactly run.c's stdout bytes for every reference generation (vocabulary from ${source})`, () => {
      const tok = new SpmTokenizer(load(), { source })
      for (const c of cases) {
        const out = printed(tok, c.prompt_tokens[0]!, c.next_tokens)
        expect(out.toString('latin1'), JSON.stringify(c.prompt)).toBe(Buffer.from(c.stdout, 'utf8').toString('latin1'))
      }
    })
  }

  it('covers byte tokens in the references (newline <0x0A> = 13)', () => {
    expect(cases.some((c) => c.next_tokens.includes(13))).toBe(true)
  })

  it('finds byte-fallback ids by looking up <0xNN> pieces (both vocabularies: byte + 3)', () => {
    for (const [, load] of vocabularies) {
      const vocab = load()
      for (let b = 0; b < 256; b++) {
        expect(vocab.tokens.indexOf(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`)).toBe(b + 3)
      }
    }
  })

  it('follows run.c on edge cases: empty text, BOS flag, EOS flag, byte fallback, NUL', () => {
    const tok = new SpmTokenizer(readTokenizerBin(TOK512, 512))
    expect(tok.encode('')).toEqual([1])
    expect(tok.encode('', { bos: false })).toEqual([])
    expect(tok.encode('Once upon a time', { bos: false, eos: true })).toEqual([403, 407, 261, 378, 2])
    // 'é' (C3 A9) is a piece: a whole code point is looked up; 'ü' (C3 BC) is not: one byte-fallback token per byte.
    expect(tok.encode('é')).toEqual([1, 410, 485])
    expect(tok.encode('ü')).toEqual([1, 410, 0xc3 + 3, 0xbc + 3])
    // 4-byte code points too (F0 9F 99 82), then the byte tokens never merge.
    expect(tok.encode('\u{1F642}', { bos: false })).toEqual([410, 0xf0 + 3, 0x9f + 3, 0x99 + 3, 0x82 + 3])
    // Like the C string, the text ends at a NUL byte.
    expect(tok.encode('Once\u0000upon')).toEqual(tok.encode('Once'))
    expect(tok.encode(new TextEncoder().encode('Once upon a time'))).toEqual([1, 403, 407, 261, 378])
  })

  it('decodes like run.c decode and prints like safe_printf', () => {
    const tok = new SpmTokenizer(readTokenizerBin(TOK512, 512))
    const text = (b: Uint8Array) => Buffer.from(b).toString('latin1')
    expect(text(tok.pieceBytes(1, 403))).toBe('Once') // leading space dropped after BOS
    expect(text(tok.pieceBytes(378, 403))).toBe(' Once')
    expect([...tok.pieceBytes(5, 13)]).toEqual([0x0a]) // <0x0A> is the raw byte
    expect([...tok.printedBytes(5, 13)]).toEqual([0x0a]) // whitespace prints
    expect([...tok.pieceBytes(5, 0xc3 + 3)]).toEqual([0xc3])
    expect([...tok.printedBytes(5, 0xc3 + 3)]).toEqual([]) // a lone non-ASCII byte prints nothing (C locale)
    expect([...tok.printedBytes(5, 0x07 + 3)]).toEqual([]) // BEL: neither printable nor space
    expect([...tok.printedBytes(5, 3)]).toEqual([]) // <0x00>: printf("%s") prints nothing
    expect(text(tok.printedBytes(5, 2))).toBe('\n</s>\n') // run.c prints EOS's piece (it stops only at BOS)
    expect(() => tok.pieceBytes(1, 512)).toThrow(RangeError)
  })

  it('matches a literal transliteration of run.c encode on 300 random texts', () => {
    const vocab = readTokenizerBin(TOK512, 512)
    const tok = new SpmTokenizer(vocab)
    const utf8 = new TextEncoder()
    const keys = vocab.tokens.map((t) => String.fromCharCode(...utf8.encode(t)))
    const lookup = (s: string) => keys.indexOf(s) // no duplicate pieces in tok512.bin
    // run.c encode, line by line (bos = 1, byte fallback = byte + 3, O(n^2) merges with string concatenation).
    const runC = (text: string): number[] => {
      const bytes = utf8.encode(text)
      const tokens = [1]
      if (bytes.length > 0) tokens.push(lookup(' '))
      let buf: number[] = []
      for (let c = 0; c < bytes.length; c++) {
        if ((bytes[c]! & 0xc0) !== 0x80) buf = []
        buf.push(bytes[c]!)
        if (((bytes[c + 1] ?? 0) & 0xc0) === 0x80 && buf.length < 4) continue
        const id = lookup(String.fromCharCode(...buf))
        if (id !== -1) tokens.push(id)
        else for (const b of buf) tokens.push(b + 3)
        buf = []
      }
      for (;;) {
        let best = -1e10
        let bestId = -1
        let bestIdx = -1
        for (let i = 0; i < tokens.length - 1; i++) {
          const id = lookup(keys[tokens[i]!]! + keys[tokens[i + 1]!]!)
          if (id !== -1 && vocab.scores[id]! > best) {
            best = vocab.scores[id]!
            bestId = id
            bestIdx = i
          }
        }
        if (bestIdx === -1) break
        tokens.splice(bestIdx, 2, bestId)
      }
      return tokens
    }
    const alphabet = [...new Set(cases.map((c) => c.stdout).join(''))].concat(['é', 'ü', '€', '中', '\u{1F642}', '\t'])
    let seed = 12345
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31
      return seed % n
    }
    for (let k = 0; k < 300; k++) {
      const text = Array.from({ length: rand(60) }, () => alphabet[rand(alphabet.length)]).join('')
      expect(tok.encode(text), JSON.stringify(text)).toEqual(runC(text))
    }
  })

  it('differs from tok512.bin with the GGUF vocabulary only in the BOS/EOS pieces', () => {
    const gguf = new SpmTokenizer(readGguf(STORIES_GGUF).vocab!)
    const bin = new SpmTokenizer(readTokenizerBin(TOK512, 512))
    const diff: number[] = []
    for (let id = 0; id < 512; id++) {
      if (!Buffer.from(gguf.pieceBytes(5, id)).equals(bin.pieceBytes(5, id))) diff.push(id)
    }
    expect(diff).toEqual([1, 2])
  })
})

describe('SpmTokenizer on hand-made vocabularies', () => {
  const bytePieces = Array.from({ length: 256 }, (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`)
  const make = (tokens: string[], scores: number[]): Vocabulary => ({
    model: 'llama',
    tokens,
    scores: Float32Array.from(scores),
    bosId: 1,
    eosId: 2,
  })

  it('merges the highest-scoring pair first, the leftmost on ties, and reads U+2581 as a space', () => {
    const tokens = ['<unk>', '<s>', '</s>', ...bytePieces, '\u2581', 'a', 'b', 'ab', 'ba', '\u2581a']
    const id = (p: string) => tokens.indexOf(p)
    // 'ab' scores above 'ba'; '▁a' lowest.
    const scores = tokens.map((p) => (p === 'ab' ? -1 : p === 'ba' ? -2 : p === '\u2581a' ? -3 : 0))
    const tok = new SpmTokenizer(make(tokens, scores))
    // ' ' 'a' 'b' 'a' → ' ' 'ab' 'a' (ab beats ba and ▁a) → no more pairs (' ab', 'aba' absent).
    expect(tok.encode('aba', { bos: false })).toEqual([id('\u2581'), id('ab'), id('a')])
    // ' ' 'b' 'a' 'b' → ' ' 'b' 'ab' (ab at index 2 beats ba at index 1).
    expect(tok.encode('bab', { bos: false })).toEqual([id('\u2581'), id('b'), id('ab')])
    // pairs never scoring above -1e10 never merge
    const low = new SpmTokenizer(make(tokens, tokens.map((p) => (p === 'ab' || p === '\u2581a' ? -2e10 : 0))))
    expect(low.encode('ab', { bos: false })).toEqual([id('\u2581'), id('a'), id('b')])
  })

  it('uses the ids of the <0xNN> pieces, wherever they sit in the vocabulary', () => {
    const tokens = ['<unk>', '<s>', '</s>', ' ', 'x', ...bytePieces]
    const tok = new SpmTokenizer(make(tokens, tokens.map(() => 0)))
    expect(tok.encode('\n', { bos: false })).toEqual([3, 5 + 0x0a])
    expect([...tok.pieceBytes(4, 5 + 0x0a)]).toEqual([0x0a])
  })

  it('rejects a vocabulary without byte-fallback pieces or without the space piece', () => {
    const noBytes = make(['<unk>', '<s>', '</s>', ' ', 'a'], [0, 0, 0, 0, 0])
    expectFormatError(() => new SpmTokenizer(noBytes, { source: 'test-vocab' }), 'TokenizerFormatError', 'test-vocab', '256 byte-fallback pieces are missing', '<0x00>')
    const noSpace = make(['<unk>', '<s>', '</s>', ...bytePieces], Array(259).fill(0))
    expectFormatError(() => new SpmTokenizer(noSpace, { source: 'v2' }), 'TokenizerFormatError', 'v2', 'dummy prefix')
  })
})
