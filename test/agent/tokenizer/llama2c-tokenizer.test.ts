import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { readTokenizerBin } from '../../../agent/tokenizer/llama2c-tokenizer.ts'
import { expectFormatError } from '../../splitter/formats/format-error.ts'
import { HAVE_MODELS, SKIP_REASON, TOK512 } from '../../splitter/formats/models-dir.ts'

if (!HAVE_MODELS) console.warn(SKIP_REASON)

describe.skipIf(!HAVE_MODELS)('readTokenizerBin on tok512.bin', () => {
  it('reads 512 pieces and scores in llama2.c spelling', () => {
    const vocab = readTokenizerBin(TOK512, 512)
    expect(vocab.model).toBe('llama')
    expect(vocab.tokens.length).toBe(512)
    expect(vocab.scores.length).toBe(512)
    expect([vocab.bosId, vocab.eosId]).toEqual([1, 2])
    expect(vocab.tokens.slice(0, 4)).toEqual(['<unk>', '\n<s>\n', '\n</s>\n', '<0x00>'])
    expect(vocab.tokens[403]).toBe(' Once')
    expect(vocab.scores[261]).toBe(-2)
    expect(vocab.tokens[410]).toBe(' ')
  })
})

describe('readTokenizerBin errors', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-tok-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('names a missing file', () => {
    const path = join(dir, 'missing.bin')
    expectFormatError(() => readTokenizerBin(path, 512), 'TokenizerFormatError', path, 'no such file')
  })

  it('names a truncated file and a vocab size that does not match the file', () => {
    if (!HAVE_MODELS) return
    const bytes = readFileSync(TOK512)
    const cut = join(dir, 'cut.bin')
    writeFileSync(cut, bytes.subarray(0, 3000))
    expectFormatError(() => readTokenizerBin(cut, 512), 'TokenizerFormatError', cut, 'file is 3000 bytes', 'truncated')
    expectFormatError(() => readTokenizerBin(TOK512, 513), 'TokenizerFormatError', TOK512, 'token 512')
    expectFormatError(() => readTokenizerBin(TOK512, 511), 'TokenizerFormatError', TOK512, 'bytes follow token 510')
  })

  it('names a piece length outside 0..max_token_length', () => {
    const path = join(dir, 'bad-length.bin')
    const bytes = new Uint8Array(4 + 8)
    const view = new DataView(bytes.buffer)
    view.setInt32(0, 7, true)
    view.setFloat32(4, 0, true)
    view.setInt32(8, 99, true)
    writeFileSync(path, bytes)
    expectFormatError(() => readTokenizerBin(path, 3), 'TokenizerFormatError', path, 'token 0 has length 99, expected 0..7')
  })
})
