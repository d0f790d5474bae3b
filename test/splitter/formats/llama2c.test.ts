import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { readLlama2c } from '../../../splitter/formats/llama2c.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { readTensorBytes, readTensorF32 } from '../../../splitter/formats/read-tensor.ts'
import { expectFormatError } from './format-error.ts'
import { HAVE_MODELS, SKIP_REASON, STORIES_BIN } from './models-dir.ts'

/** Canonical names of a `nLayers`-layer llama, sorted. */
function canonicalNames(nLayers: number): string[] {
  const names = ['token_embd.weight', 'output_norm.weight', 'output.weight']
  for (let i = 0; i < nLayers; i++) {
    for (const t of ['attn_norm', 'attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_norm', 'ffn_gate', 'ffn_down', 'ffn_up']) {
      names.push(`blk.${i}.${t}.weight`)
    }
  }
  return names.sort()
}

/** A llama2.c checkpoint: header then `floats` fp32 values 0, 1, 2, ... (so offsets can be read back as values). */
function checkpoint(header: readonly number[], floats: number): Uint8Array {
  const bytes = new Uint8Array(28 + floats * 4)
  const view = new DataView(bytes.buffer)
  header.forEach((v, i) => {
    view.setInt32(i * 4, v, true)
  })
  for (let k = 0; k < floats; k++) view.setFloat32(28 + k * 4, k, true)
  return bytes
}

if (!HAVE_MODELS) console.warn(SKIP_REASON)

describe.skipIf(!HAVE_MODELS)('readLlama2c on stories260K.bin', () => {
  it('reads the config from the 7 header fields and run.c constants', () => {
    const model = readLlama2c(STORIES_BIN)
    expect(model.format).toBe('llama2c')
    expect(model.path).toBe(STORIES_BIN)
    expect(model.vocab).toBeUndefined()
    expect(model.config).toEqual({
      arch: 'llama',
      dim: 64,
      hiddenDim: 172,
      nLayers: 5,
      nHeads: 8,
      nKvHeads: 4,
      headDim: 8,
      vocabSize: 512,
      maxSeqLen: 512,
      normEps: 1e-5,
      ropeTheta: 10000,
      ropeStyle: 'adjacent',
    })
  })

  it('lists every canonical tensor with [out, in] shapes in run.c order, the classifier shared', () => {
    const model = readLlama2c(STORIES_BIN)
    expect([...model.tensors.keys()].sort()).toEqual(canonicalNames(5))
    const t = (name: string) => model.tensors.get(name)!
    expect(t('token_embd.weight')).toEqual({
      name: 'token_embd.weight',
      dtype: 'f32',
      shape: [512, 64],
      offsetBytes: 28,
      byteLength: 512 * 64 * 4,
    })
    expect(t('output.weight').offsetBytes).toBe(28)
    expect(t('output.weight').shape).toEqual([512, 64])
    // rms_att_weight follows the embedding, then wq for all 5 layers.
    expect(t('blk.0.attn_norm.weight').offsetBytes).toBe(28 + 512 * 64 * 4)
    expect(t('blk.1.attn_norm.weight').offsetBytes).toBe(28 + 512 * 64 * 4 + 64 * 4)
    expect(t('blk.0.attn_q.weight').offsetBytes).toBe(28 + 512 * 64 * 4 + 5 * 64 * 4)
    expect(t('blk.0.attn_k.weight').shape).toEqual([32, 64])
    expect(t('blk.0.attn_output.weight').shape).toEqual([64, 64])
    expect(t('blk.0.ffn_gate.weight').shape).toEqual([172, 64])
    expect(t('blk.0.ffn_down.weight').shape).toEqual([64, 172])
    expect(t('blk.0.ffn_up.weight').shape).toEqual([172, 64])
    // The final norm is followed by freq_cis_real and freq_cis_imag (2 × 512 × 4 floats), then the end of the file.
    const fileBytes = readFileSync(STORIES_BIN).byteLength
    expect(t('output_norm.weight').offsetBytes + 64 * 4 + 2 * 512 * 4 * 4).toBe(fileBytes)
  })

  it('reads a tensor as exactly its bytes at its offset', () => {
    const model = readLlama2c(STORIES_BIN)
    const file = readFileSync(STORIES_BIN)
    const ref = model.tensors.get('blk.3.ffn_down.weight')!
    const bytes = readTensorBytes(model, 'blk.3.ffn_down.weight')
    expect(bytes.byteOffset).toBe(0)
    expect(Buffer.from(bytes).equals(file.subarray(ref.offsetBytes, ref.offsetBytes + ref.byteLength))).toBe(true)
    const values = readTensorF32(model, 'blk.3.ffn_down.weight')
    expect(values.length).toBe(64 * 172)
    expect(values[5]).toBe(file.readFloatLE(ref.offsetBytes + 20))
  })

  it('is what loadModel returns for a file without the GGUF magic', () => {
    expect(loadModel(STORIES_BIN)).toEqual(readLlama2c(STORIES_BIN))
  })
})

describe('llama2.c checkpoints written by hand', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-llama2c-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  // dim 4, hidden 6, 1 layer, 2 heads, 1 KV head (head size 2), vocab 3, seq 2.
  // floats: emb 12, rms_att 4, wq 16, wk 8, wv 8, wo 16, rms_ffn 4, w1 24, w2 24, w3 24, rms_final 4, freq_cis 2+2.
  const SHARED_FLOATS = 12 + 4 + 16 + 8 + 8 + 16 + 4 + 24 + 24 + 24 + 4 + 4

  it('maps a negative vocab_size to a separate classifier stored after freq_cis', () => {
    const path = join(dir, 'unshared.bin')
    writeFileSync(path, checkpoint([4, 6, 1, 2, 1, -3, 2], SHARED_FLOATS + 12))
    const model = readLlama2c(path)
    expect(model.config.vocabSize).toBe(3)
    expect(model.config.headDim).toBe(2)
    expect([...readTensorF32(model, 'token_embd.weight')]).toEqual([...Array(12).keys()])
    expect([...readTensorF32(model, 'output.weight')]).toEqual([...Array(12).keys()].map((k) => SHARED_FLOATS + k))
    // w2 (ffn_down) starts after emb, rms_att, wq, wk, wv, wo, rms_ffn, w1 = 92 floats.
    expect(readTensorF32(model, 'blk.0.ffn_down.weight')[0]).toBe(92)
    expect(model.tensors.get('blk.0.ffn_down.weight')!.shape).toEqual([4, 6])
  })

  it('rejects a truncated checkpoint, saying expected and actual bytes', () => {
    const path = join(dir, 'truncated.bin')
    writeFileSync(path, checkpoint([4, 6, 1, 2, 1, 3, 2], SHARED_FLOATS).subarray(0, 28 + 100))
    const expected = 28 + SHARED_FLOATS * 4
    expectFormatError(() => readLlama2c(path), 'ModelFormatError', path, 'truncated', `${expected} bytes`, '128 bytes')
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, 'truncated')
  })

  it('rejects trailing bytes (e.g. a shared-classifier header on an unshared file)', () => {
    const path = join(dir, 'trailing.bin')
    writeFileSync(path, checkpoint([4, 6, 1, 2, 1, 3, 2], SHARED_FLOATS + 12))
    expectFormatError(() => readLlama2c(path), 'ModelFormatError', path, 'trailing bytes')
  })

  it('rejects the real checkpoint cut in the middle of its weights', () => {
    if (!HAVE_MODELS) return
    const path = join(dir, 'stories-cut.bin')
    writeFileSync(path, readFileSync(STORIES_BIN).subarray(0, 500_000))
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, '1056540 bytes', '500000 bytes')
  })

  it('rejects a header that is not plausible', () => {
    const cases: [number[], string][] = [
      [[4, 6, 1, 3, 1, 3, 2], 'dim 4 is not a multiple of n_heads 3'],
      [[4, 6, 1, 2, 3, 3, 2], 'n_heads 2 is not a multiple of n_kv_heads 3'],
      [[0, 6, 1, 2, 1, 3, 2], 'dim is 0'],
      [[6, 6, 1, 2, 1, 3, 2], 'head size 3 is odd'],
    ]
    for (const [header, detail] of cases) {
      const path = join(dir, 'bad-header.bin')
      writeFileSync(path, checkpoint(header, 8))
      expectFormatError(() => readLlama2c(path), 'ModelFormatError', path, detail)
    }
  })

  it('rejects a file shorter than the header', () => {
    const path = join(dir, 'short.bin')
    writeFileSync(path, new Uint8Array(12))
    expectFormatError(() => readLlama2c(path), 'ModelFormatError', path, 'file is 12 bytes', 'at least 28')
  })

  it('names missing files and directories', () => {
    const missing = join(dir, 'nope.bin')
    expectFormatError(() => readLlama2c(missing), 'ModelFormatError', missing, 'no such file')
    const sub = join(dir, 'a-directory')
    mkdirSync(sub)
    expectFormatError(() => readLlama2c(sub), 'ModelFormatError', sub, 'is a directory')
  })
})
