import { copyFileSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { HfTokenizer } from '../../../agent/tokenizer/hf-tokenizer.ts'
import { loadTokenizer } from '../../../agent/tokenizer/load-tokenizer.ts'
import { SpmTokenizer } from '../../../agent/tokenizer/spm-tokenizer.ts'
import { ggufBpeTokenizerJson } from '../../../splitter/formats/gguf-bpe-tokenizer.ts'
import type { GgufValue } from '../../../splitter/formats/gguf.ts'
import { readGguf } from '../../../splitter/formats/gguf.ts'
import type { ModelDescription } from '../../../splitter/model.ts'
import { bl, byteLevelVocab } from '../../splitter/formats/byte-level-fixture.ts'
import { HAVE_MODELS, STORIES_BIN, STORIES_GGUF, TOK512 } from '../../splitter/formats/models-dir.ts'
import { readLlama2c } from '../../../splitter/formats/llama2c.ts'

const { tokens, merges, types } = byteLevelVocab()
const EOT = tokens.indexOf('<|endoftext|>')

/** The byte-level test vocabulary as a tokenizer.json, optionally with a BOS template. */
function byteLevelJson(options: { addBos?: boolean } = {}): string {
  const meta = new Map<string, GgufValue>([
    ['tokenizer.ggml.merges', merges],
    ['tokenizer.ggml.token_type', Int32Array.from(types)],
    ['tokenizer.ggml.pre', 'qwen2'],
    ['tokenizer.ggml.add_bos_token', options.addBos ?? false],
  ])
  return ggufBpeTokenizerJson('test.gguf', meta, tokens, EOT)
}

/** Concatenated printed bytes of `ids` (each after its predecessor; the first after `first`). */
function printed(tok: HfTokenizer, ids: readonly number[], first: number): Buffer {
  return Buffer.concat(ids.map((t, i) => tok.printedBytes(i === 0 ? first : ids[i - 1]!, t)))
}

describe('HfTokenizer on a byte-level BPE document', () => {
  it('maps each of the 256 byte tokens back to its byte (GPT-2 alphabet inverted)', () => {
    const tok = new HfTokenizer(byteLevelJson())
    for (let b = 0; b < 256; b++) expect(tok.printedBytes(EOT, b), `byte ${b}`).toEqual(Uint8Array.of(b))
  })

  it('never drops or alters a byte: control characters, emoji, combining marks, CJK, lone continuation splits', () => {
    const tok = new HfTokenizer(byteLevelJson())
    const texts = ['\u0000\u0001\t\n\r\u001f\u007f', 'e\u0301 Zoë ÅÄÖ', '🎉👩‍👩‍👧 你好，世界', ' the  the\n\nthe ', 'ab\u00a0cd\u00ad']
    for (const text of texts) {
      const ids = tok.encode(text)
      expect(printed(tok, ids, -1), JSON.stringify(text)).toEqual(Buffer.from(text, 'utf8'))
      expect(tok.decode(ids)).toBe(text)
    }
  })

  it('takes BOS from the post-processor template unless given, and -1 when there is none', () => {
    expect(new HfTokenizer(byteLevelJson({ addBos: true })).bosId).toBe(EOT)
    expect(new HfTokenizer(byteLevelJson({ addBos: true })).encode('x')).toEqual([EOT, 'x'.charCodeAt(0)])
    expect(new HfTokenizer(byteLevelJson()).bosId).toBe(-1)
    expect(new HfTokenizer(byteLevelJson()).eosId).toBe(-1)
    const given = new HfTokenizer(byteLevelJson(), { bosId: 3, eosId: EOT })
    expect([given.bosId, given.eosId]).toEqual([3, EOT])
    expect(given.tokenToId(bl(' the'))).toBe(tokens.indexOf(bl(' the')))
    expect(given.idToToken(EOT)).toBe('<|endoftext|>')
  })

  it('refuses ids outside the vocabulary and documents that are not tokenizers', () => {
    const tok = new HfTokenizer(byteLevelJson())
    expect(() => tok.printedBytes(0, tokens.length)).toThrow(RangeError)
    expect(() => tok.printedBytes(0, -1)).toThrow(/cannot decode token -1/)
    const err = (json: string) => {
      try {
        new HfTokenizer(json, { source: '/m/tokenizer.json' })
      } catch (e) {
        return e as Error
      }
      throw new Error('expected an error')
    }
    expect(err('{"model": ').name).toBe('TokenizerFormatError')
    expect(err('{"model": ').message).toMatch(/^cannot load tokenizer \/m\/tokenizer.json: is not valid JSON/)
    expect(err('{"version": "1.0"}').message).toContain('has no model.vocab')
    expect(err('{"model": {"type": "Nope", "vocab": {}}}').message).toContain('@huggingface/tokenizers refused it')
  })
})

describe('HfTokenizer on a sentencepiece-style document (Metaspace, byte fallback)', () => {
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 }
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b
  for (const p of ['\u2581', 'a', 'b', '\u2581a', 'ab', '\u2581ab']) vocab[p] = Object.keys(vocab).length
  const doc = {
    added_tokens: [
      { id: 0, content: '<unk>', special: true },
      { id: 1, content: '<s>', special: true },
      { id: 2, content: '</s>', special: true },
    ],
    normalizer: { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '\u2581' }, { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' }] },
    pre_tokenizer: null,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: { type: 'Sequence', decoders: [{ type: 'Replace', pattern: { String: '\u2581' }, content: ' ' }, { type: 'ByteFallback' }, { type: 'Fuse' }, { type: 'Strip', content: ' ', start: 1, stop: 0 }] },
    model: { type: 'BPE', unk_token: '<unk>', byte_fallback: true, fuse_unk: true, vocab, merges: [['\u2581', 'a'], ['a', 'b'], ['\u2581a', 'b']] },
  }
  const tok = new HfTokenizer(JSON.stringify(doc), { eosId: 2 })
  const id = (p: string) => vocab[p]!

  it('prepends BOS and the dummy-prefix space, merges, and falls back to bytes', () => {
    expect(tok.bosId).toBe(1)
    expect(tok.encode('ab ab')).toEqual([1, id('\u2581ab'), id('\u2581ab')])
    expect(tok.encode('é')).toEqual([1, id('\u2581'), 3 + 0xc3, 3 + 0xa9])
    expect(tok.encode('')).toEqual([1])
  })

  it('prints spaces for ▁, raw bytes for <0xNN>, and drops the leading space only after BOS', () => {
    expect(Buffer.from(tok.printedBytes(1, id('\u2581ab'))).toString()).toBe('ab')
    expect(Buffer.from(tok.printedBytes(id('ab'), id('\u2581ab'))).toString()).toBe(' ab')
    expect(tok.printedBytes(id('ab'), 3 + 0xc3)).toEqual(Uint8Array.of(0xc3))
    expect(tok.printedBytes(id('ab'), 2)).toEqual(new Uint8Array(0)) // special
    const ids = tok.encode('ab é ab')
    expect(printed(tok, ids.slice(1), 1).toString('utf8')).toBe('ab é ab')
  })
})

describe('loadTokenizer picks the tokenizer the model calls for', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-loadtok-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))
  const fake = (over: Partial<ModelDescription>): ModelDescription => ({
    path: join(dir, 'model.bin'),
    format: 'llama2c',
    config: { arch: 'llama', dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, headDim: 8, vocabSize: 512, maxSeqLen: 512, normEps: 1e-5, ropeTheta: 10000, ropeStyle: 'adjacent' },
    tensors: new Map(),
    ...over,
  })

  it('a document in the model → HfTokenizer with the model ids', () => {
    const tok = loadTokenizer(fake({ format: 'gguf', tokenizerJson: byteLevelJson(), bosId: EOT, eosId: 5 }))
    expect(tok).toBeInstanceOf(HfTokenizer)
    expect([tok.bosId, tok.eosId]).toEqual([EOT, 5])
  })

  it('nothing at all → a one-line UsageError saying what was looked for', () => {
    let caught: Error | undefined
    try {
      loadTokenizer(fake({}))
    } catch (e) {
      caught = e as Error
    }
    expect(caught?.name).toBe('UsageError')
    expect(caught?.message).toBe(
      `no tokenizer for ${join(dir, 'model.bin')}: it carries no vocabulary, and there is no ${join(dir, 'tok512.bin')} or ` +
        `${join(dir, 'tokenizer.bin')}; pass --tokenizer PATH (a llama2.c tokenizer.bin)`,
    )
  })

  it.skipIf(!HAVE_MODELS)('explicit path first, then the model vocabulary, then tok<vocab>.bin beside the model', () => {
    const gguf = readGguf(STORIES_GGUF)
    const fromVocab = loadTokenizer(gguf)
    expect(fromVocab).toBeInstanceOf(SpmTokenizer)
    const explicit = loadTokenizer(gguf, TOK512)
    expect(explicit).toBeInstanceOf(SpmTokenizer)
    // tok512.bin spells BOS '\n<s>\n' (llama2.c), the GGUF '<s>': which vocabulary was used shows in the pieces
    expect(Buffer.from((explicit as SpmTokenizer).pieceBytes(0, 1)).toString()).toBe('\n<s>\n')
    expect(Buffer.from((fromVocab as SpmTokenizer).pieceBytes(0, 1)).toString()).toBe('<s>')
    copyFileSync(TOK512, join(dir, 'tok512.bin'))
    const beside = loadTokenizer({ ...readLlama2c(STORIES_BIN), path: join(dir, 'model.bin') })
    expect(beside.encode('Once upon a time')).toEqual([1, 403, 407, 261, 378])
  })
})
