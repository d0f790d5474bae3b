import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ggmlTypeName, readGguf, readGgufMetadata } from '../../../splitter/formats/gguf.ts'
import { readLlama2c } from '../../../splitter/formats/llama2c.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { readTensorBytes, readTensorF32 } from '../../../splitter/formats/read-tensor.ts'
import { readTokenizerBin } from '../../../agent/tokenizer/llama2c-tokenizer.ts'
import { expectFormatError } from './format-error.ts'
import {
  buildGguf,
  kvNestedU8,
  kvString,
  kvU32,
  kvU64,
  TINY,
  tinyLlamaKvs,
  tinyLlamaTensors,
  tinyValues,
} from './gguf-fixture.ts'
import { HAVE_MODELS, SKIP_REASON, STORIES_BIN, STORIES_GGUF, TOK512 } from './models-dir.ts'

if (!HAVE_MODELS) console.warn(SKIP_REASON)

describe.skipIf(!HAVE_MODELS)('readGguf on stories260K.gguf', () => {
  it('reads the llama config from the llama.* keys', () => {
    const model = readGguf(STORIES_GGUF)
    expect(model.format).toBe('gguf')
    const { normEps, ...rest } = model.config
    expect(rest).toEqual({
      arch: 'llama',
      dim: 64,
      hiddenDim: 172,
      nLayers: 5,
      nHeads: 8,
      nKvHeads: 4,
      headDim: 8,
      vocabSize: 512,
      // llama.cpp's llama2.c converter writes its own n_ctx (default 128), not the checkpoint's seq_len 512.
      maxSeqLen: 128,
      ropeTheta: 10000,
      ropeStyle: 'adjacent',
    })
    expect(normEps).toBe(Math.fround(1e-5)) // stored as float32
  })

  it('parses the header: version, all metadata, tensor infos, aligned data section', () => {
    const h = readGgufMetadata(STORIES_GGUF)
    expect(h.version).toBe(3)
    expect(h.alignment).toBe(32)
    expect(h.metadata.size).toBe(19)
    expect(h.tensorInfos.length).toBe(48)
    expect(h.dataOffsetBytes % 32).toBe(0)
    expect(h.dataOffsetBytes).toBe(14176) // tensor infos end at 14152
    expect(h.metadata.get('general.architecture')).toBe('llama')
    expect(h.metadata.get('tokenizer.ggml.token_type')).toBeInstanceOf(Int32Array)
    expect((h.metadata.get('tokenizer.ggml.token_type') as Int32Array).slice(0, 4)).toEqual(Int32Array.of(2, 3, 3, 6))
    expect(h.metadata.get('tokenizer.ggml.padding_token_id')).toBe(0xffffffff)
    expect(h.tensorInfos[0]).toEqual({ name: 'token_embd.weight', dims: [64, 512], ggmlType: 0, relOffsetBytes: 0 })
    const last = h.tensorInfos.at(-1)!
    expect(h.dataOffsetBytes + last.relOffsetBytes + 64 * 4).toBe(h.fileBytes)
  })

  it('gives the same canonical tensors, shapes and byte-identical f32 data as the llama2.c checkpoint', () => {
    const gguf = readGguf(STORIES_GGUF)
    const bin = readLlama2c(STORIES_BIN)
    expect([...gguf.tensors.keys()].sort()).toEqual([...bin.tensors.keys()].sort())
    for (const [name, ref] of bin.tensors) {
      const g = gguf.tensors.get(name)!
      expect(g.shape, name).toEqual(ref.shape)
      expect(g.dtype).toBe('f32')
      const a = readTensorF32(bin, name)
      const b = readTensorF32(gguf, name)
      expect(Buffer.from(b.buffer).equals(Buffer.from(a.buffer)), `${name} differs`).toBe(true)
    }
    // The converter stored the shared classifier as a separate copy: same values, other bytes of the file.
    expect(gguf.tensors.get('output.weight')!.offsetBytes).not.toBe(gguf.tensors.get('token_embd.weight')!.offsetBytes)
  })

  it('carries the same vocabulary as tok512.bin up to sentencepiece spelling', () => {
    const vocab = readGguf(STORIES_GGUF).vocab!
    const bin = readTokenizerBin(TOK512, 512)
    expect(vocab.model).toBe('llama')
    expect(vocab.tokens.length).toBe(512)
    expect(vocab.bosId).toBe(1)
    expect(vocab.eosId).toBe(2)
    expect(vocab.scores).toEqual(bin.scores) // every score identical
    const differing: [number, string, string][] = []
    for (let id = 0; id < 512; id++) {
      // GGUF keeps sentencepiece's U+2581 for spaces; llama2.c's exporter replaced it with ' '.
      if (vocab.tokens[id]!.replaceAll('\u2581', ' ') !== bin.tokens[id]) {
        differing.push([id, vocab.tokens[id]!, bin.tokens[id]!])
      }
    }
    // llama2.c's tokenizer.py wraps BOS/EOS in newlines ('\n<s>\n'); GGUF keeps the sentencepiece pieces.
    expect(differing).toEqual([
      [1, '<s>', '\n<s>\n'],
      [2, '</s>', '\n</s>\n'],
    ])
    const spmSpaces = vocab.tokens.filter((t) => t.includes('\u2581')).length
    expect(spmSpaces).toBe(bin.tokens.filter((t) => t.includes(' ')).length)
    expect(spmSpaces).toBe(91)
  })

  it('is what loadModel returns for a file with the GGUF magic', () => {
    expect(loadModel(STORIES_GGUF)).toEqual(readGguf(STORIES_GGUF))
  })
})

describe('GGUF files written by hand', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-gguf-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  const write = (name: string, bytes: Uint8Array): string => {
    const path = join(dir, name)
    writeFileSync(path, bytes)
    return path
  }

  it('reads F16 tensors as f32, reverses dims into [out, in] shapes, honours the defaults', () => {
    const path = write('tiny-f16.gguf', buildGguf({ kvs: tinyLlamaKvs(), tensors: tinyLlamaTensors('f16') }))
    const model = readGguf(path)
    expect(model.config).toEqual({
      arch: 'llama',
      dim: 4,
      hiddenDim: 6,
      nLayers: 1,
      nHeads: 2,
      nKvHeads: 1,
      headDim: 2,
      vocabSize: 3,
      maxSeqLen: 16,
      normEps: Math.fround(1e-6),
      ropeTheta: 500000,
      ropeStyle: 'adjacent',
    })
    const gate = model.tensors.get('blk.0.ffn_gate.weight')!
    expect(gate.dtype).toBe('f16')
    expect(gate.shape).toEqual([TINY.hiddenDim, TINY.dim])
    expect(gate.byteLength).toBe(6 * 4 * 2)
    // tensor #9 in tinyLlamaTensors order (with output.weight)
    expect([...readTensorF32(model, 'blk.0.ffn_gate.weight')]).toEqual(tinyValues(9, 24))
    expect(readTensorBytes(model, 'blk.0.ffn_gate.weight').byteLength).toBe(48)
    expect(model.vocab).toEqual({
      model: 'llama',
      tokens: ['<unk>', '<s>', '</s>'],
      scores: new Float32Array(3),
      bosId: 1,
      eosId: 2,
    })
  })

  it('points a missing output.weight at token_embd.weight (tied embeddings), honours general.alignment', () => {
    const kvs = [...tinyLlamaKvs(), kvU32('general.alignment', 64)]
    const path = write('tied.gguf', buildGguf({ kvs, tensors: tinyLlamaTensors('f32', false), alignment: 64 }))
    const model = readGguf(path)
    expect(readGgufMetadata(path).dataOffsetBytes % 64).toBe(0)
    const embd = model.tensors.get('token_embd.weight')!
    expect(model.tensors.get('output.weight')).toEqual({ ...embd, name: 'output.weight' })
    expect([...readTensorF32(model, 'output.weight')]).toEqual(tinyValues(0, 12))
    expect([...readTensorF32(model, 'blk.0.ffn_up.weight')]).toEqual(tinyValues(10, 24))
  })

  it('accepts version 2 and reads u64 and nested-array metadata', () => {
    const kvs = [...tinyLlamaKvs(), kvU64('test.big', 2 ** 40), kvNestedU8('test.nested', [[1, 2], [3]])]
    const path = write('v2.gguf', buildGguf({ kvs, tensors: tinyLlamaTensors('f32'), version: 2 }))
    const h = readGgufMetadata(path)
    expect(h.version).toBe(2)
    expect(h.metadata.get('test.big')).toBe(2n ** 40n)
    expect(h.metadata.get('test.nested')).toEqual([Uint8Array.of(1, 2), Uint8Array.of(3)])
    expect(readGguf(path).config.dim).toBe(4)
  })

  it('rejects an unsupported tensor type, naming the tensor and the type', () => {
    const tensors = tinyLlamaTensors('f32').map((t) =>
      t.name === 'blk.0.attn_q.weight' ? { ...t, ggmlType: 12, data: new Uint8Array(144) } : t,
    )
    const path = write('q4k.gguf', buildGguf({ kvs: tinyLlamaKvs(), tensors }))
    expectFormatError(
      () => readGguf(path),
      'ModelFormatError',
      path,
      'tensor blk.0.attn_q.weight has GGML type 12 (Q4_K), supported: F32, F16, BF16, Q8_0, Q4_0',
    )
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, 'Q4_K')
    expect([ggmlTypeName(8), ggmlTypeName(12), ggmlTypeName(30), ggmlTypeName(99)]).toEqual([
      'Q8_0',
      'Q4_K',
      'BF16',
      'unknown',
    ])
  })

  it('rejects a Q4_0 / Q8_0 tensor whose rows are not whole blocks of 32, naming the tensor and its offset', () => {
    for (const type of [2, 8]) {
      const tensors = tinyLlamaTensors('f32').map((t) =>
        t.name === 'blk.0.attn_q.weight' ? { ...t, ggmlType: type, data: new Uint8Array(34) } : t,
      )
      const path = write(`q-${type}.gguf`, buildGguf({ kvs: tinyLlamaKvs(), tensors }))
      const h = readGgufMetadata(path)
      const offset = h.dataOffsetBytes + h.tensorInfos.find((t) => t.name === 'blk.0.attn_q.weight')!.relOffsetBytes
      expectFormatError(
        () => readGguf(path),
        'ModelFormatError',
        path,
        `tensor blk.0.attn_q.weight at offset ${offset} is ${ggmlTypeName(type)} with innermost dimension 4, ` +
          'not a multiple of the block size 32',
      )
    }
  })

  it('rejects tensor data cut off, naming the tensor and its offset', () => {
    const full = buildGguf({ kvs: tinyLlamaKvs(), tensors: tinyLlamaTensors('f32') })
    const path = write('cut.gguf', full.subarray(0, full.byteLength - 10))
    const err = expectFormatError(() => readGguf(path), 'ModelFormatError', path, 'blk.0.ffn_up.weight', 'truncated')
    const ref = readGguf(write('whole.gguf', full)).tensors.get('blk.0.ffn_up.weight')!
    expect(err.message).toContain(`offset ${ref.offsetBytes}`)
  })

  it('rejects the real GGUF with its last tensors cut off', () => {
    if (!HAVE_MODELS) return
    const path = write('stories-cut.gguf', readFileSync(STORIES_GGUF).subarray(0, 1_000_000))
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, 
      'tensor blk.3.ffn_up.weight (44032 bytes at offset 959328)',
      'past the end of the file (1000000 bytes)',
    )
  })

  it('rejects a header cut inside the metadata', () => {
    const full = buildGguf({ kvs: tinyLlamaKvs(), tensors: tinyLlamaTensors('f32') })
    const path = write('cut-header.gguf', full.subarray(0, 100))
    expectFormatError(() => readGguf(path), 'ModelFormatError', path, 'GGUF header is truncated', 'metadata')
  })

  it('rejects a bad magic, unsupported versions, architectures and tokenizers', () => {
    const good = buildGguf({ kvs: tinyLlamaKvs(), tensors: tinyLlamaTensors('f32') })
    const badMagic = good.slice()
    badMagic[3] = 0x58 // 'GGUX'
    const p1 = write('magic.gguf', badMagic)
    expectFormatError(() => readGguf(p1), 'ModelFormatError', p1, 'expected GGUF magic', '47 47 55 58')

    const p2 = write('v1.gguf', buildGguf({ kvs: tinyLlamaKvs(), tensors: [], version: 1 }))
    expectFormatError(() => readGguf(p2), 'ModelFormatError', p2, 'GGUF version is 1, supported: 2, 3')

    const bigEndian = good.slice()
    bigEndian.set([0, 0, 0, 3], 4)
    const p3 = write('be.gguf', bigEndian)
    expectFormatError(() => readGguf(p3), 'ModelFormatError', p3, 'big-endian')

    const p4 = write('phi.gguf', buildGguf({ kvs: tinyLlamaKvs({ arch: 'phi3' }), tensors: tinyLlamaTensors('f32') }))
    expectFormatError(() => readGguf(p4), 'ModelFormatError', p4, 'architecture is "phi3", supported: llama, qwen2')

    const p5 = write('berttok.gguf', buildGguf({ kvs: tinyLlamaKvs({ tokenizerModel: 'bert' }), tensors: tinyLlamaTensors('f32') }))
    expectFormatError(() => readGguf(p5), 'ModelFormatError', p5, 'tokenizer.ggml.model is "bert"', 'supported: "llama"', '"gpt2"')

    // A gpt2 vocabulary without merges cannot be tokenized.
    const p6 = write('gpt2-nomerges.gguf', buildGguf({ kvs: tinyLlamaKvs({ tokenizerModel: 'gpt2' }), tensors: tinyLlamaTensors('f32') }))
    expectFormatError(() => readGguf(p6), 'ModelFormatError', p6, 'tokenizer.ggml.merges is missing')
  })

  it('rejects missing keys, missing tensors and shapes that disagree with the config', () => {
    const noDim = tinyLlamaKvs().filter((_, i) => i !== 1) // drops llama.embedding_length
    const p1 = write('nodim.gguf', buildGguf({ kvs: noDim, tensors: tinyLlamaTensors('f32') }))
    expectFormatError(() => readGguf(p1), 'ModelFormatError', p1, 'llama.embedding_length is missing')

    const noUp = tinyLlamaTensors('f32').filter((t) => t.name !== 'blk.0.ffn_up.weight')
    const p2 = write('noup.gguf', buildGguf({ kvs: tinyLlamaKvs(), tensors: noUp }))
    expectFormatError(() => readGguf(p2), 'ModelFormatError', p2, 'tensor blk.0.ffn_up.weight is missing')

    const kvs = [...tinyLlamaKvs().filter((_, i) => i !== 2), kvU32('llama.feed_forward_length', 8)]
    const p3 = write('ff.gguf', buildGguf({ kvs, tensors: tinyLlamaTensors('f32') }))
    expectFormatError(() => readGguf(p3), 'ModelFormatError', p3, 'blk.0.ffn_gate.weight has shape [6, 4]', '[8, 4]')

    const p4 = write('arch-int.gguf', buildGguf({ kvs: [kvString('general.name', 'x')], tensors: [] }))
    expectFormatError(() => readGguf(p4), 'ModelFormatError', p4, 'no general.architecture')
  })
})
