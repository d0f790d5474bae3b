import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { readHfFolder } from '../../../splitter/formats/hf-folder.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { readTensorF32 } from '../../../splitter/formats/read-tensor.ts'
import { readSafetensorsHeader } from '../../../splitter/formats/safetensors.ts'
import { expectFormatError } from './format-error.ts'
import { buildSafetensors, TINY_HF_CONFIG, tinyHfTensors, writeTinyHfFolder } from './hf-fixture.ts'

let root: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'edgeshard-st-'))
})
afterAll(() => rmSync(root, { recursive: true, force: true }))
let n = 0
const fresh = (): string => join(root, `case-${n++}`)

describe('readSafetensorsHeader', () => {
  it('parses dtypes, shapes, absolute offsets and the metadata', () => {
    const path = join(root, 'ok.safetensors')
    writeFileSync(path, buildSafetensors(tinyHfTensors('BF16')))
    const h = readSafetensorsHeader(path)
    expect(h.metadata).toEqual({ format: 'pt' })
    expect(h.dataOffsetBytes).toBe(8 + h.headerBytes)
    expect(h.dataOffsetBytes % 8).toBe(0)
    const up = h.tensors.get('model.layers.0.mlp.up_proj.weight')!
    expect(up).toMatchObject({ dtype: 'bf16', storedDtype: 'BF16', shape: [6, 4], byteLength: 48 })
    // tensors follow each other from the start of the data section
    const embd = h.tensors.get('model.embed_tokens.weight')!
    expect(embd.offsetBytes).toBe(h.dataOffsetBytes)
    expect(h.tensors.size).toBe(12)
  })

  it('names the file, the tensor and the offset for every malformed case', () => {
    const write = (name: string, bytes: Uint8Array | string): string => {
      const path = join(root, name)
      writeFileSync(path, bytes)
      return path
    }
    const good = buildSafetensors(tinyHfTensors())
    const header = readSafetensorsHeader(write('good.safetensors', good))
    const up = header.tensors.get('model.layers.0.mlp.up_proj.weight')!

    const short = write('short.safetensors', 'abc')
    expectFormatError(() => readSafetensorsHeader(short), 'ModelFormatError', short, 'file is 3 bytes')

    // "bad magic": a GGUF (or any other file) read as safetensors gives an absurd header length
    const gguf = write('not.safetensors', Buffer.concat([Buffer.from('GGUF'), Buffer.alloc(60)]))
    expectFormatError(() => readSafetensorsHeader(gguf), 'ModelFormatError', gguf, 'header length at offset 0 is', 'not a safetensors file', '47 47 55 46')

    const past = good.slice()
    new DataView(past.buffer).setBigUint64(0, BigInt(good.byteLength), true)
    const p1 = write('past.safetensors', past)
    expectFormatError(() => readSafetensorsHeader(p1), 'ModelFormatError', p1, `header length at offset 0 is ${good.byteLength} bytes, past the end`)

    const notJson = good.slice()
    notJson[8] = 0x5b // '['
    const p2 = write('bracket.safetensors', notJson)
    expectFormatError(() => readSafetensorsHeader(p2), 'ModelFormatError', p2, 'header at offset 8 starts with bytes 5b', "expected a JSON object ('{')")

    const broken = good.slice()
    broken[9] = 0x7b // '{{'
    const p3 = write('broken.safetensors', broken)
    expectFormatError(() => readSafetensorsHeader(p3), 'ModelFormatError', p3, 'is not valid JSON')

    const cut = write('cut.safetensors', good.subarray(0, good.byteLength - 10))
    expectFormatError(
      () => readSafetensorsHeader(cut),
      'ModelFormatError',
      cut,
      'tensor lm_head.weight (data_offsets [',
      'bytes at offset ',
      `past the end of the file (${good.byteLength - 10} bytes): the file is truncated`,
    )

    const retype = (dtype: string) =>
      buildSafetensors(tinyHfTensors(), (h) => ({
        ...h,
        'model.layers.0.mlp.up_proj.weight': { ...(h['model.layers.0.mlp.up_proj.weight'] as object), dtype },
      }))
    const p4 = write('unknown.safetensors', retype('X9'))
    expectFormatError(
      () => readSafetensorsHeader(p4),
      'ModelFormatError',
      p4,
      `tensor model.layers.0.mlp.up_proj.weight (data_offsets [`,
      `96 bytes at offset ${up.offsetBytes})`,
      'unknown dtype "X9", supported: F32, F16, BF16',
    )
    const p5 = write('i8.safetensors', retype('I8'))
    expectFormatError(() => readSafetensorsHeader(p5), 'ModelFormatError', p5, 'model.layers.0.mlp.up_proj.weight', 'has dtype "I8", supported: F32, F16, BF16')

    const p6 = write(
      'shape.safetensors',
      buildSafetensors(tinyHfTensors(), (h) => ({
        ...h,
        'model.layers.0.mlp.up_proj.weight': { ...(h['model.layers.0.mlp.up_proj.weight'] as object), shape: [6, 5] },
      })),
    )
    expectFormatError(
      () => readSafetensorsHeader(p6),
      'ModelFormatError',
      p6,
      `tensor model.layers.0.mlp.up_proj.weight (data_offsets [`,
      `at offset ${up.offsetBytes})`,
      'its shape [6, 5] of F32 needs 120 bytes, data_offsets give 96',
    )
    const p7 = write(
      'offsets.safetensors',
      buildSafetensors(tinyHfTensors(), (h) => ({ ...h, 'model.norm.weight': { dtype: 'F32', shape: [4], data_offsets: [16, 0] } })),
    )
    expectFormatError(() => readSafetensorsHeader(p7), 'ModelFormatError', p7, 'tensor model.norm.weight: data_offsets is [16,0]')
  })
})

describe('readHfFolder / loadModel on a Hugging Face folder', () => {
  it('maps HF names to canonical ones and reads the config, tokenizer ids and files', () => {
    const dir = writeTinyHfFolder(fresh())
    const model = loadModel(dir)
    expect(model.format).toBe('safetensors')
    expect(model.path).toBe(dir)
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
      normEps: 1e-6,
      ropeTheta: 500000,
      ropeStyle: 'halves',
    })
    expect([...model.tensors.keys()].sort()).toEqual(
      [
        'token_embd.weight',
        'blk.0.attn_norm.weight',
        'blk.0.attn_q.weight',
        'blk.0.attn_k.weight',
        'blk.0.attn_v.weight',
        'blk.0.attn_output.weight',
        'blk.0.ffn_norm.weight',
        'blk.0.ffn_gate.weight',
        'blk.0.ffn_up.weight',
        'blk.0.ffn_down.weight',
        'output_norm.weight',
        'output.weight',
      ].sort(),
    )
    for (const t of model.tensors.values()) expect(t.file).toBe(join(dir, 'model.safetensors'))
    // tensor number 8 of tinyHfTensors is up_proj: values 800 + k/2
    expect([...readTensorF32(model, 'blk.0.ffn_up.weight')]).toEqual(Array.from({ length: 24 }, (_, k) => 800 + k * 0.5))
    expect([...readTensorF32(model, 'output.weight')]).toEqual(Array.from({ length: 12 }, (_, k) => 1100 + k * 0.5))
    expect(model.bosId).toBe(1)
    expect(model.eosId).toBe(2)
    expect(JSON.parse(model.tokenizerJson!).model.type).toBe('BPE')
    // a file of the folder designates the folder
    expect(loadModel(join(dir, 'model.safetensors'))).toEqual(model)
    expect(loadModel(join(dir, 'config.json'))).toEqual(model)
  })

  it('qwen2 and attention_bias give qkvBias and map the biases; tied embeddings; head_dim and defaults', () => {
    const bias = (name: string, k: number) => ({ name, dtype: 'F32', shape: [k], data: new Uint8Array(Float32Array.from({ length: k }, (_, i) => i).buffer) })
    const tensors = [
      ...tinyHfTensors().filter((t) => t.name !== 'lm_head.weight'),
      bias('model.layers.0.self_attn.q_proj.bias', 4),
      bias('model.layers.0.self_attn.k_proj.bias', 2),
      bias('model.layers.0.self_attn.v_proj.bias', 2),
      bias('model.layers.0.self_attn.rotary_emb.inv_freq', 1), // unused by the model: ignored
    ]
    const { rope_theta: _theta, ...rest } = TINY_HF_CONFIG
    const dir = writeTinyHfFolder(fresh(), {
      'config.json': { ...rest, architectures: ['Qwen2ForCausalLM'], tie_word_embeddings: true, head_dim: 2 },
      'model.safetensors': buildSafetensors(tensors),
    })
    const model = readHfFolder(dir)
    expect(model.config).toMatchObject({ arch: 'qwen2', qkvBias: true, headDim: 2, ropeTheta: 10000, ropeStyle: 'halves' })
    expect(model.tensors.get('blk.0.attn_k.bias')).toMatchObject({ shape: [2], dtype: 'f32' })
    expect(model.tensors.get('output.weight')!.offsetBytes).toBe(model.tensors.get('token_embd.weight')!.offsetBytes)
    expect(model.tensors.has('blk.0.rotary_emb.inv_freq')).toBe(false)
  })

  it('reads sharded weights through model.safetensors.index.json, each tensor from its own file', () => {
    const tensors = tinyHfTensors('F16')
    const a = tensors.slice(0, 5)
    const b = tensors.slice(5)
    const weightMap = Object.fromEntries([...a.map((t) => [t.name, 'a.safetensors']), ...b.map((t) => [t.name, 'b.safetensors'])])
    const dir = writeTinyHfFolder(fresh(), {
      'model.safetensors': null,
      'a.safetensors': buildSafetensors(a),
      'b.safetensors': buildSafetensors(b),
      'model.safetensors.index.json': { metadata: {}, weight_map: weightMap },
    })
    const model = loadModel(dir)
    expect(model.tensors.get('token_embd.weight')!.file).toBe(join(dir, 'a.safetensors'))
    expect(model.tensors.get('blk.0.ffn_up.weight')!.file).toBe(join(dir, 'b.safetensors'))
    expect([...readTensorF32(model, 'blk.0.ffn_up.weight')]).toEqual(Array.from({ length: 24 }, (_, k) => 800 + k * 0.5))
  })

  it('refuses bad folders before anything else happens, naming the file, key or tensor', () => {
    const d1 = writeTinyHfFolder(fresh(), { 'config.json': { ...TINY_HF_CONFIG, hidden_size: undefined } })
    expectFormatError(() => loadModel(d1), 'ModelFormatError', join(d1, 'config.json'), 'key hidden_size is missing')

    const d2 = writeTinyHfFolder(fresh(), { 'config.json': { ...TINY_HF_CONFIG, architectures: ['GPTNeoXForCausalLM'] } })
    expectFormatError(() => loadModel(d2), 'ModelFormatError', join(d2, 'config.json'), '["GPTNeoXForCausalLM"]', 'LlamaForCausalLM')

    const d3 = writeTinyHfFolder(fresh(), { 'tokenizer.json': null })
    expectFormatError(() => loadModel(d3), 'TokenizerFormatError', join(d3, 'tokenizer.json'), 'no such file')

    const d4 = writeTinyHfFolder(fresh(), { 'tokenizer.json': '{"model": ' })
    expectFormatError(() => loadModel(d4), 'TokenizerFormatError', join(d4, 'tokenizer.json'), 'is not valid JSON')

    const d5 = writeTinyHfFolder(fresh(), { 'tokenizer_config.json': { bos_token: '<|begin_of_text|>' } })
    expectFormatError(() => loadModel(d5), 'TokenizerFormatError', join(d5, 'tokenizer_config.json'), 'bos_token "<|begin_of_text|>" is not in')

    const d6 = writeTinyHfFolder(fresh(), { 'model.safetensors': null })
    expectFormatError(() => loadModel(d6), 'ModelFormatError', d6, 'looked for model.safetensors and model.safetensors.index.json')

    const d7 = writeTinyHfFolder(fresh(), {
      'model.safetensors': null,
      'model.safetensors.index.json': { weight_map: { 'model.norm.weight': 'gone.safetensors' } },
    })
    expectFormatError(() => loadModel(d7), 'ModelFormatError', join(d7, 'gone.safetensors'), 'no such file')

    const d8 = writeTinyHfFolder(fresh(), {
      'model.safetensors': null,
      'only.safetensors': buildSafetensors(tinyHfTensors()),
      'model.safetensors.index.json': { weight_map: { 'model.layers.7.mlp.up_proj.weight': 'only.safetensors' } },
    })
    expectFormatError(() => loadModel(d8), 'ModelFormatError', join(d8, 'only.safetensors'), 'has no tensor model.layers.7.mlp.up_proj.weight')

    const d9 = writeTinyHfFolder(fresh(), {
      'model.safetensors': buildSafetensors(tinyHfTensors().filter((t) => t.name !== 'model.layers.0.mlp.down_proj.weight')),
    })
    expectFormatError(() => loadModel(d9), 'ModelFormatError', join(d9, 'model.safetensors'), 'tensor blk.0.ffn_down.weight (model.layers.0.mlp.down_proj.weight) is missing')

    const d10 = writeTinyHfFolder(fresh(), { 'config.json': { ...TINY_HF_CONFIG, intermediate_size: 8 } })
    expectFormatError(() => loadModel(d10), 'ModelFormatError', join(d10, 'model.safetensors'), 'blk.0.ffn_gate.weight (model.layers.0.mlp.gate_proj.weight) has shape [6, 4], the config implies [8, 4]')

    const d11 = writeTinyHfFolder(fresh(), { 'config.json': { ...TINY_HF_CONFIG, rope_scaling: { rope_type: 'llama3', factor: 32 } } })
    expectFormatError(() => loadModel(d11), 'ModelFormatError', join(d11, 'config.json'), 'rope_scaling', 'not supported')

    const d12 = writeTinyHfFolder(fresh(), { 'config.json': null })
    expectFormatError(() => loadModel(d12), 'ModelFormatError', d12, 'is a directory without config.json')
    const lone = join(d12, 'model.safetensors')
    expectFormatError(() => loadModel(lone), 'ModelFormatError', lone, 'without a config.json beside it')

    // a truncated shard fails at load, naming the shard, the tensor and its offset
    const full = readFileSync(join(writeTinyHfFolder(fresh()), 'model.safetensors'))
    const d13 = writeTinyHfFolder(fresh(), { 'model.safetensors': full.subarray(0, full.byteLength - 4) })
    expectFormatError(() => loadModel(d13), 'ModelFormatError', join(d13, 'model.safetensors'), 'tensor lm_head.weight', 'at offset', 'truncated')
  })
})
