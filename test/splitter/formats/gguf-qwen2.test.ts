import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { HfTokenizer } from '../../../agent/tokenizer/hf-tokenizer.ts'
import { loadTokenizer } from '../../../agent/tokenizer/load-tokenizer.ts'
import { readGguf } from '../../../splitter/formats/gguf.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import {
  BYTE_LEVEL_SPECIALS,
  bl,
  buildTinyQwen2,
  byteLevelTokenizerKvs,
  byteLevelVocab,
  CHATML_TEMPLATE,
  QWEN_TINY,
} from './byte-level-fixture.ts'
import { expectFormatError } from './format-error.ts'
import { kvI32s, kvStrings } from './gguf-fixture.ts'

const { tokens } = byteLevelVocab()
const id = (piece: string): number => {
  const i = tokens.indexOf(piece)
  if (i < 0) throw new Error(`no piece ${piece}`)
  return i
}
const utf8 = (s: string) => Buffer.from(s, 'utf8')
/** The bytes the generation loop prints for `ids` (each token after its predecessor). */
function printed(tok: HfTokenizer, ids: readonly number[]): Buffer {
  const parts: Uint8Array[] = []
  for (let i = 0; i < ids.length; i++) parts.push(tok.printedBytes(i > 0 ? ids[i - 1]! : tok.bosId, ids[i]!))
  return Buffer.concat(parts)
}

describe('GGUF qwen2 with a gpt2 (byte-level BPE) vocabulary', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-qwen2-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))
  const write = (name: string, bytes: Uint8Array): string => {
    const path = join(dir, name)
    writeFileSync(path, bytes)
    return path
  }

  it('reads the qwen2.* config: halves RoPE, Q/K/V biases, mixed tensor types with block sizes', () => {
    const path = write('tiny-qwen2.gguf', buildTinyQwen2())
    const model = loadModel(path)
    expect(model.config).toEqual({
      arch: 'qwen2',
      dim: 32,
      hiddenDim: 64,
      nLayers: 1,
      nHeads: 4,
      nKvHeads: 2,
      headDim: 8,
      vocabSize: tokens.length,
      maxSeqLen: 64,
      normEps: Math.fround(1e-6),
      ropeTheta: 1000000,
      ropeStyle: 'halves',
      qkvBias: true,
    })
    const t = (name: string) => model.tensors.get(name)!
    expect(t('blk.0.attn_q.bias')).toMatchObject({ dtype: 'f32', shape: [32], byteLength: 128 })
    expect(t('blk.0.attn_k.bias')).toMatchObject({ dtype: 'f32', shape: [16], byteLength: 64 })
    expect(t('blk.0.attn_v.bias')).toMatchObject({ dtype: 'f32', shape: [16], byteLength: 64 })
    expect(t('blk.0.ffn_gate.weight')).toMatchObject({ dtype: 'q8_0', shape: [64, 32], byteLength: 64 * 34 })
    expect(t('blk.0.ffn_up.weight')).toMatchObject({ dtype: 'q4_0', shape: [64, 32], byteLength: 64 * 18 })
    expect(t('blk.0.attn_output.weight')).toMatchObject({ dtype: 'bf16', shape: [32, 32], byteLength: 32 * 32 * 2 })
    expect(t('blk.0.ffn_down.weight')).toMatchObject({ dtype: 'f16', shape: [32, 64], byteLength: 32 * 64 * 2 })
    // tied classifier
    expect(t('output.weight').offsetBytes).toBe(t('token_embd.weight').offsetBytes)
    expect(model.vocab).toBeUndefined()
    expect(model.bosId).toBe(id('<|endoftext|>'))
    expect(model.eosId).toBe(id('<|im_end|>'))
    expect(model.chatTemplate).toBe(CHATML_TEMPLATE)
  })

  it('converts the vocabulary to a tokenizer.json: BPE vocab and merges, Qwen2 split regex, control tokens special', () => {
    const model = readGguf(write('tok.gguf', buildTinyQwen2()))
    const doc = JSON.parse(model.tokenizerJson!)
    expect(doc.model.type).toBe('BPE')
    expect(Object.keys(doc.model.vocab)).toHaveLength(tokens.length)
    expect(doc.model.vocab[bl(' the')]).toBe(id(bl(' the')))
    expect(doc.model.merges[2]).toEqual([bl(' t'), bl('he')])
    expect(doc.model.ignore_merges).toBe(false)
    expect(doc.pre_tokenizer.pretokenizers[0].pattern.Regex).toContain('\\p{N}|') // Qwen2: one digit at a time
    expect(doc.decoder.type).toBe('ByteLevel')
    expect(doc.post_processor.type).toBe('ByteLevel') // add_bos_token false: nothing prepended
    expect(doc.added_tokens.map((t: { content: string; special: boolean }) => [t.content, t.special])).toEqual(
      BYTE_LEVEL_SPECIALS.map(([content, type]) => [content, type === 3]),
    )
  })

  it('round-trips UTF-8 text with non-ASCII characters through encode and the printed bytes', () => {
    const model = readGguf(write('rt.gguf', buildTinyQwen2()))
    const tok = loadTokenizer(model)
    expect(tok).toBeInstanceOf(HfTokenizer)
    const hf = tok as HfTokenizer
    const text = 'Héllo wörld — 你好 the 🎉 end\n\tthe'
    const ids = hf.encode(text)
    expect(ids[0]).not.toBe(model.bosId) // Qwen2 adds no BOS
    expect(printed(hf, ids)).toEqual(utf8(text))
    expect(hf.decode(ids)).toBe(text)
    // merges apply: ' the' is one token, é one token, 你 is the merged pair E4 BD then the byte A0
    expect(hf.encode(' the')).toEqual([id(bl(' the'))])
    expect(hf.encode('é')).toEqual([id(bl('é'))])
    expect(hf.encode('你')).toEqual([id(bl([0xe4, 0xbd])), id(bl([0xa0]))])
    // a character split over two tokens prints its bytes piecewise, none dropped
    expect(hf.printedBytes(0, id(bl([0xe4, 0xbd])))).toEqual(Uint8Array.of(0xe4, 0xbd))
    expect(hf.printedBytes(0, id(bl([0xa0])))).toEqual(Uint8Array.of(0xa0))
    // control tokens written in the text are their ids and print nothing; user-defined ones print their text
    const chat = hf.encode('<|im_start|>user\nhi<|im_end|><think>')
    expect(chat[0]).toBe(id('<|im_start|>'))
    expect(chat.at(-2)).toBe(id('<|im_end|>'))
    expect(chat.at(-1)).toBe(id('<think>'))
    expect(hf.printedBytes(0, id('<|im_end|>'))).toEqual(new Uint8Array(0))
    expect(Buffer.from(hf.printedBytes(0, id('<think>'))).toString()).toBe('<think>')
    expect(hf.bosId).toBe(model.bosId)
    expect(hf.eosId).toBe(model.eosId)
  })

  it('Llama 3 pre-tokenizer: BOS added by default, ignore_merges; no pre gives the GPT-2 split', () => {
    const bos = id('<|endoftext|>')
    const llama3 = readGguf(
      write('llama3.gguf', buildTinyQwen2({ tokenizerKvs: byteLevelTokenizerKvs({ pre: 'llama-bpe' }) })),
    )
    const doc = JSON.parse(llama3.tokenizerJson!)
    expect(doc.model.ignore_merges).toBe(true)
    expect(doc.pre_tokenizer.pretokenizers[0].pattern.Regex).toContain('\\p{N}{1,3}')
    const tok = loadTokenizer(llama3) as HfTokenizer
    const ids = tok.encode('the wörld')
    expect(ids[0]).toBe(bos)
    expect(printed(tok, ids.slice(1))).toEqual(utf8('the wörld'))
    expect(tok.encode('x', { bos: false })[0]).not.toBe(bos)

    const gpt2 = readGguf(write('gpt2.gguf', buildTinyQwen2({ tokenizerKvs: byteLevelTokenizerKvs({ addBos: true }) })))
    const gdoc = JSON.parse(gpt2.tokenizerJson!)
    expect(gdoc.pre_tokenizer.pretokenizers[0].pattern.Regex).toContain(" ?\\p{L}+| ?\\p{N}+")
    const g = loadTokenizer(gpt2) as HfTokenizer
    expect(g.encode('the')[0]).toBe(bos)
    expect(printed(g, g.encode('Héllo 12 ünï', { bos: false }))).toEqual(utf8('Héllo 12 ünï'))
  })

  it('rejects an unknown pre-tokenizer, a bad token_type array, a missing bias, a K-quant tensor', () => {
    const p1 = write('pre.gguf', buildTinyQwen2({ tokenizerKvs: byteLevelTokenizerKvs({ pre: 'falcon-x' }) }))
    expectFormatError(() => readGguf(p1), 'ModelFormatError', p1, 'tokenizer.ggml.pre is "falcon-x"', 'qwen2')

    const kvs = byteLevelTokenizerKvs({ pre: 'qwen2' }).map((kv, i) => (i === 2 ? kvI32s('tokenizer.ggml.token_type', [1, 1]) : kv))
    const p2 = write('types.gguf', buildTinyQwen2({ tokenizerKvs: kvs }))
    expectFormatError(() => readGguf(p2), 'ModelFormatError', p2, 'tokenizer.ggml.token_type', `${tokens.length} values`)

    const p3 = write('nobias.gguf', buildTinyQwen2({ override: { name: 'blk.0.attn_k.bias', dims: [8] } }))
    expectFormatError(() => readGguf(p3), 'ModelFormatError', p3, 'tensor blk.0.attn_k.bias has shape [8]', `[${QWEN_TINY.nKvHeads * 8}]`)

    const p4 = write('q4k.gguf', buildTinyQwen2({ override: { name: 'blk.0.ffn_up.weight', ggmlType: 12 } }))
    expectFormatError(() => readGguf(p4), 'ModelFormatError', p4, 'tensor blk.0.ffn_up.weight has GGML type 12 (Q4_K)')

    const badMerges = kvStrings('tokenizer.ggml.merges', ['abc'])
    const p5 = write('merge.gguf', buildTinyQwen2({ tokenizerKvs: [...byteLevelTokenizerKvs({ pre: 'qwen2' }).filter((_, i) => i !== 3), badMerges] }))
    expectFormatError(() => readGguf(p5), 'ModelFormatError', p5, 'tokenizer.ggml.merges[0]', 'two pieces')
  })
})

