import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { HfTokenizer } from '../../../agent/tokenizer/hf-tokenizer.ts'
import { loadTokenizer } from '../../../agent/tokenizer/load-tokenizer.ts'
import { readLlama2c } from '../../../splitter/formats/llama2c.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { readTensorF32 } from '../../../splitter/formats/read-tensor.ts'
import { f32ToBf16Bytes, f32ToF16Bytes } from '../../../splitter/quant/ggml-blocks.ts'
import { permuteForHf, writeStoriesHfFolder } from './hf-fixture.ts'
import { HAVE_MODELS, REFERENCE_JSON, SKIP_REASON, STORIES_BIN, TOK512 } from './models-dir.ts'

if (!HAVE_MODELS) console.warn(SKIP_REASON)

interface ReferenceCase {
  prompt: string
  prompt_tokens: number[]
  next_tokens: number[]
  stdout: string
}

describe.skipIf(!HAVE_MODELS)('stories260K written as a Hugging Face folder by the test', () => {
  let root: string
  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'edgeshard-hf-'))
  })
  afterAll(() => rmSync(root, { recursive: true, force: true }))

  it('loads with the llama2.c config, halves RoPE, and the .bin weights (Q/K in HF row order)', () => {
    const dir = writeStoriesHfFolder(join(root, 'f32'), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype: 'F32', shards: 1 })
    const hf = loadModel(dir)
    const bin = readLlama2c(STORIES_BIN)
    expect(hf.config).toEqual({ ...bin.config, ropeStyle: 'halves' })
    expect([...hf.tensors.keys()].sort()).toEqual([...bin.tensors.keys()].sort())
    const { nHeads, nKvHeads, headDim, dim } = bin.config
    for (const name of bin.tensors.keys()) {
      let want = readTensorF32(bin, name)
      if (name.endsWith('attn_q.weight')) want = permuteForHf(want, nHeads, headDim, dim)
      if (name.endsWith('attn_k.weight')) want = permuteForHf(want, nKvHeads, headDim, dim)
      expect(Buffer.from(readTensorF32(hf, name).buffer).equals(Buffer.from(want.buffer)), name).toBe(true)
    }
    expect(hf.bosId).toBe(1)
    expect(hf.eosId).toBe(2)
    expect(hf.chatTemplate).toContain('bos_token')
  })

  it('the tokenizer.json built from tok512 encodes and prints exactly like llama2.c', () => {
    const dir = writeStoriesHfFolder(join(root, 'tok'), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype: 'F32', shards: 1 })
    const tok = loadTokenizer(loadModel(dir))
    expect(tok).toBeInstanceOf(HfTokenizer)
    const cases = JSON.parse(readFileSync(REFERENCE_JSON, 'utf8')) as ReferenceCase[]
    for (const c of cases) {
      expect(tok.encode(c.prompt), c.prompt).toEqual(c.prompt_tokens)
      const parts: Uint8Array[] = []
      let prev = c.prompt_tokens[0]!
      for (const t of c.next_tokens) {
        if (t === tok.bosId) break
        parts.push(tok.printedBytes(prev, t))
        prev = t
      }
      expect(`${Buffer.concat(parts).toString('utf8')}\n`).toBe(c.stdout)
    }
    // byte fallback: characters outside the 512 pieces become <0xNN> tokens and print as those bytes
    const ids = tok.encode('Zoë 你')
    const bytes = Buffer.concat(ids.slice(1).map((t, i) => tok.printedBytes(ids[i]!, t)))
    expect(bytes.toString('utf8')).toBe('Zoë 你')
  })

  it('F16 and BF16 shards hold the rounded weights, each tensor in its shard', () => {
    const bin = readLlama2c(STORIES_BIN)
    for (const [dtype, round] of [
      ['F16', f32ToF16Bytes],
      ['BF16', f32ToBf16Bytes],
    ] as const) {
      const dir = writeStoriesHfFolder(join(root, dtype), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype, shards: 2 })
      const hf = loadModel(dir)
      const files = new Set([...hf.tensors.values()].map((t) => t.file))
      expect(files).toEqual(new Set([join(dir, 'model-00001-of-00002.safetensors'), join(dir, 'model-00002-of-00002.safetensors')]))
      expect(hf.tensors.get('blk.4.ffn_up.weight')!.dtype).toBe(dtype.toLowerCase())
      const want = round(readTensorF32(bin, 'blk.4.ffn_up.weight'))
      const got = round(readTensorF32(hf, 'blk.4.ffn_up.weight'))
      expect(Buffer.from(got).equals(Buffer.from(want))).toBe(true)
    }
  })
})
