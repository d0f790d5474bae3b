import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { readTokenizerBin } from '../../../agent/tokenizer/llama2c-tokenizer.ts'
import { SpmTokenizer } from '../../../agent/tokenizer/spm-tokenizer.ts'
import { readGgufMetadata } from '../../../splitter/formats/gguf.ts'
import {
  chooseTensorType,
  ggufBpeVocabMetadata,
  ggufConfigMetadata,
  ggufLlamaVocabMetadata,
  planGgufExport,
} from '../../../splitter/formats/gguf-export.ts'
import { gguf, writeGguf } from '../../../splitter/formats/gguf-writer.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { readTensorBytes } from '../../../splitter/formats/read-tensor.ts'
import type { ModelDescription } from '../../../splitter/model.ts'
import { decodeToF32, encodeFromF32 } from '../../../splitter/quant/dtype-codec.ts'
import { referenceCases } from '../../support/cli.ts'
import { STORIES_TOKENIZER_CONFIG, writeStoriesHfFolder } from './hf-fixture.ts'
import { HAVE_MODELS, STORIES_BIN, STORIES_GGUF, TOK512 } from './models-dir.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-gguf-export-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

async function exportTo(model: ModelDescription, name: string, options: Parameters<typeof planGgufExport>[1]) {
  const plan = planGgufExport(model, options)
  const path = join(dir, name)
  await writeGguf(path, plan.metadata, plan.tensors)
  return { plan, path, out: loadModel(path) }
}

/** A small llama GGUF (dim 64, hidden 96, 1 layer, 4 heads of 16, 2 KV heads, vocab 4) with values sin(t·100 + k). */
async function tinyModel(name: string, dtype: 'f32' | 'q8_0' = 'f32'): Promise<ModelDescription> {
  const config = {
    arch: 'llama', dim: 64, hiddenDim: 96, nLayers: 1, nHeads: 4, nKvHeads: 2, headDim: 16, vocabSize: 4,
    maxSeqLen: 32, normEps: 1e-5, ropeTheta: 10000, ropeStyle: 'adjacent',
  } as const
  const shapes: [string, number[]][] = [
    ['token_embd.weight', [4, 64]],
    ['output_norm.weight', [64]],
    ['blk.0.attn_norm.weight', [64]],
    ['blk.0.attn_q.weight', [64, 64]],
    ['blk.0.attn_k.weight', [32, 64]],
    ['blk.0.attn_v.weight', [32, 64]],
    ['blk.0.attn_output.weight', [64, 64]],
    ['blk.0.ffn_norm.weight', [64]],
    ['blk.0.ffn_gate.weight', [96, 64]],
    ['blk.0.ffn_down.weight', [64, 96]],
    ['blk.0.ffn_up.weight', [96, 64]],
  ]
  const path = join(dir, name)
  await writeGguf(
    path,
    [
      ['general.architecture', 'llama'],
      ...ggufConfigMetadata(config),
      ...ggufLlamaVocabMetadata({ model: 'llama', tokens: ['<unk>', '<s>', '</s>', ' a'], scores: new Float32Array(4), bosId: 1, eosId: 2 }),
    ],
    shapes.map(([n, shape], t) => {
      const values = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, k) => Math.sin(t * 100 + k))
      const type = shape.length === 2 ? dtype : 'f32'
      return { name: n, dtype: type, shape, data: () => [encodeFromF32(type, values)] }
    }),
  )
  return loadModel(path)
}

describe('chooseTensorType (llama.cpp rule)', () => {
  it('keeps 1-D tensors f32, gives 2-D weights the requested type, falls back to f16 when blocks do not fit', () => {
    expect(chooseTensorType('blk.0.attn_norm.weight', [64], 'q4_0')).toEqual({ dtype: 'f32' })
    expect(chooseTensorType('blk.0.attn_q.bias', [896], 'f16')).toEqual({ dtype: 'f32' })
    expect(chooseTensorType('blk.0.ffn_gate.weight', [172, 64], 'q4_0')).toEqual({ dtype: 'q4_0' })
    expect(chooseTensorType('x', [172, 64], 'f32')).toEqual({ dtype: 'f32' })
    const down = chooseTensorType('blk.0.ffn_down.weight', [64, 172], 'q8_0')
    expect(down.dtype).toBe('f16')
    expect(down.fallback).toBe(
      'blk.0.ffn_down.weight [64, 172]: innermost dimension 172 is not a multiple of 32, stored as f16 instead of q8_0',
    )
    expect(chooseTensorType('w', [64, 172], 'q4_0').dtype).toBe('f16')
    expect(chooseTensorType('w', [64, 172], 'f16')).toEqual({ dtype: 'f16' })
  })
})

describe('planGgufExport', () => {
  it('copies tensors already in the target type byte for byte and dequantizes q8_0 to f32 exactly', async () => {
    const q8 = await tinyModel('tiny-q8.gguf', 'q8_0')
    const same = await exportTo(q8, 'tiny-q8-q8.gguf', { type: 'q8_0' })
    const f32 = await exportTo(q8, 'tiny-q8-f32.gguf', { type: 'f32' })
    for (const name of q8.tensors.keys()) {
      expect(readTensorBytes(same.out, name)).toEqual(readTensorBytes(q8, name))
      const ref = q8.tensors.get(name)!
      const n = ref.shape.reduce((a, b) => a * b, 1)
      expect(f32.out.tensors.get(name)!.dtype).toBe('f32')
      expect(decodeToF32('f32', readTensorBytes(f32.out, name), n)).toEqual(decodeToF32(ref.dtype, readTensorBytes(q8, name), n))
    }
    // The tied classifier (no output.weight in the source) stays tied.
    expect(same.plan.tensors.map((t) => t.name)).not.toContain('output.weight')
    expect(same.out.tensors.get('output.weight')!.offsetBytes).toBe(same.out.tensors.get('token_embd.weight')!.offsetBytes)
  })

  it('writes general.* and <arch>.* keys, and copies a GGUF source’s tokenizer keys', async () => {
    const model = await tinyModel('tiny-meta.gguf')
    const { path, out } = await exportTo(model, 'tiny-meta-q4.gguf', { type: 'q4_0', name: 'tiny' })
    const meta = readGgufMetadata(path).metadata
    expect(meta.get('general.architecture')).toBe('llama')
    expect(meta.get('general.name')).toBe('tiny')
    expect(meta.get('general.file_type')).toBe(2)
    expect(meta.get('general.quantization_version')).toBe(2)
    expect(meta.get('tokenizer.ggml.tokens')).toEqual(['<unk>', '<s>', '</s>', '▁a'])
    expect(meta.get('tokenizer.ggml.token_type')).toEqual(Int32Array.of(2, 3, 3, 1))
    expect(out.config).toEqual(model.config)
    expect(out.tensors.get('blk.0.attn_q.weight')!.dtype).toBe('q4_0')
    expect(out.tensors.get('blk.0.attn_norm.weight')!.dtype).toBe('f32')
  })

  it('permutes Q/K rows of a halves-RoPE llama model to the adjacent-pair layout GGUF llama implies', async () => {
    const model = await tinyModel('tiny-halves.gguf')
    const halves: ModelDescription = { ...model, config: { ...model.config, ropeStyle: 'halves' } }
    const { out } = await exportTo(halves, 'tiny-halves-out.gguf', { type: 'f32' })
    const headDim = 16
    for (const name of ['blk.0.attn_q.weight', 'blk.0.attn_k.weight']) {
      const rows = model.tensors.get(name)!.shape[0]!
      const src = decodeToF32('f32', readTensorBytes(model, name), rows * 64)
      const dst = decodeToF32('f32', readTensorBytes(out, name), rows * 64)
      for (let h = 0; h < rows / headDim; h++) {
        for (let i = 0; i < 2; i++) {
          for (let j = 0; j < headDim / 2; j++) {
            const from = h * headDim + i * (headDim / 2) + j
            const to = h * headDim + 2 * j + i
            expect(dst.subarray(to * 64, to * 64 + 64)).toEqual(src.subarray(from * 64, from * 64 + 64))
          }
        }
      }
    }
    expect(readTensorBytes(out, 'blk.0.attn_v.weight')).toEqual(readTensorBytes(model, 'blk.0.attn_v.weight'))
  })

  it('turns a tokenizer.json BPE vocabulary into gpt2 keys and keeps the document', () => {
    const doc = {
      model: { type: 'BPE', vocab: { a: 0, b: 1, ab: 2 }, merges: ['a b'] },
      added_tokens: [{ id: 4, content: '<|end|>', special: true }],
      post_processor: null,
    }
    const kvs = new Map(ggufBpeVocabMetadata('m', JSON.stringify(doc), { arch: 'qwen2', eosId: 4 }))
    expect(kvs.get('tokenizer.ggml.model')).toBe('gpt2')
    expect(kvs.get('tokenizer.ggml.pre')).toBe('qwen2')
    expect(kvs.get('tokenizer.ggml.tokens')).toEqual(['a', 'b', 'ab', '[PAD3]', '<|end|>'])
    expect(kvs.get('tokenizer.ggml.token_type')).toEqual(Int32Array.of(1, 1, 1, 5, 3))
    expect(kvs.get('tokenizer.ggml.merges')).toEqual(['a b'])
    expect(kvs.get('tokenizer.ggml.eos_token_id')).toEqual(gguf.u32(4))
    expect(kvs.get('tokenizer.huggingface.json')).toBe(JSON.stringify(doc))
    expect(() => ggufBpeVocabMetadata('m', '{"model":{"type":"Unigram"}}', { arch: 'llama' })).toThrow(/Unigram/)
  })
})

describe.skipIf(!HAVE_MODELS)('planGgufExport on stories260K', () => {
  it('llama2.c .bin + tok512.bin → f32 GGUF equals llama.cpp’s own conversion', async () => {
    const bin = loadModel(STORIES_BIN)
    const vocab = readTokenizerBin(TOK512, 512)
    const { path, out, plan } = await exportTo(bin, 'stories-f32.gguf', { type: 'f32', vocab })
    expect(plan.notices).toEqual([])
    const reference = loadModel(STORIES_GGUF)
    const mine = readGgufMetadata(path).metadata
    const theirs = readGgufMetadata(STORIES_GGUF).metadata
    for (const key of ['tokenizer.ggml.model', 'tokenizer.ggml.tokens', 'tokenizer.ggml.scores', 'tokenizer.ggml.token_type']) {
      expect(mine.get(key), key).toEqual(theirs.get(key))
    }
    // llama.cpp's converter declares a context of 128; the checkpoint says 512.
    expect(out.config).toEqual({ ...reference.config, maxSeqLen: 512 })
    for (const name of reference.tensors.keys()) {
      expect(readTensorBytes(out, name), name).toEqual(readTensorBytes(reference, name))
    }
    // The shared classifier is stored once.
    expect(plan.tensors.map((t) => t.name)).not.toContain('output.weight')
  })

  it('a Hugging Face folder (halves RoPE, sentencepiece tokenizer.json) → f32 GGUF equals llama.cpp’s conversion', async () => {
    const folder = writeStoriesHfFolder(join(dir, 'stories-hf'), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype: 'F32', shards: 2 })
    const hf = loadModel(folder)
    expect(hf.config.ropeStyle).toBe('halves')
    const { path, out } = await exportTo(hf, 'stories-from-hf.gguf', { type: 'f32' })
    const reference = loadModel(STORIES_GGUF)
    expect(out.config).toEqual({ ...reference.config, maxSeqLen: out.config.maxSeqLen })
    for (const name of reference.tensors.keys()) {
      expect(readTensorBytes(out, name), name).toEqual(readTensorBytes(reference, name))
    }
    const meta = readGgufMetadata(path).metadata
    expect(meta.get('tokenizer.ggml.model')).toBe('llama')
    expect(meta.get('tokenizer.ggml.tokens')).toEqual(readGgufMetadata(STORIES_GGUF).metadata.get('tokenizer.ggml.tokens'))
    expect(meta.get('tokenizer.chat_template')).toBe(STORIES_TOKENIZER_CONFIG.chat_template)
    // Scores rebuilt from the merges order the merges as tok512's scores do: the same tokens for every reference prompt.
    const tok = new SpmTokenizer(out.vocab!)
    for (const c of referenceCases()) expect(tok.encode(c.prompt)).toEqual(c.prompt_tokens)
  })

  it('q4_0: ffn_down [64, 172] falls back to f16, every other weight is q4_0, norms f32', async () => {
    const { out, plan } = await exportTo(loadModel(STORIES_GGUF), 'stories-q4.gguf', { type: 'q4_0' })
    expect(plan.notices).toHaveLength(5)
    for (const [name, ref] of out.tensors) {
      const expected = ref.shape.length === 1 ? 'f32' : name.endsWith('ffn_down.weight') ? 'f16' : 'q4_0'
      expect(ref.dtype, name).toBe(expected)
    }
  })
})
