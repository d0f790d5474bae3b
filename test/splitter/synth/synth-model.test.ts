import { describe, expect, it } from 'vitest'
import { SpmTokenizer } from '../../../agent/tokenizer/spm-tokenizer.ts'
import { planSynthGguf } from '../../../splitter/synth/synth-model.ts'
import { SYNTH_SHAPE_NAMES, SYNTH_SHAPES } from '../../../splitter/synth/synth-shapes.ts'
import { MIN_SYNTH_VOCAB, synthVocabulary } from '../../../splitter/synth/synth-vocabulary.ts'
import { decodeToF32 } from '../../../splitter/quant/dtype-codec.ts'
import type { GgufTensorSpec } from '../../../splitter/formats/gguf-writer.ts'

/** Parameter counts of the real checkpoints (Hugging Face model cards / `sum(p.numel())`, tied weights counted once). */
const PARAMETERS: Record<string, number> = {
  'tinyllama-1.1b': 1_100_048_384,
  'llama-3.2-1b': 1_235_814_400,
  'qwen2.5-0.5b': 494_032_768,
  'llama-2-7b': 6_738_415_616,
  'llama-2-13b': 13_015_864_320,
}

async function collect(spec: GgufTensorSpec): Promise<Uint8Array> {
  const parts: Uint8Array[] = []
  for await (const chunk of spec.data()) parts.push(chunk.slice())
  return Buffer.concat(parts)
}

describe('SYNTH_SHAPES', () => {
  it('lists the five public shapes', () => {
    expect(SYNTH_SHAPE_NAMES).toEqual(['tinyllama-1.1b', 'llama-3.2-1b', 'qwen2.5-0.5b', 'llama-2-7b', 'llama-2-13b'])
  })
  for (const [name, count] of Object.entries(PARAMETERS)) {
    it(`${name}: the planned tensors hold exactly the real model's ${count.toLocaleString('en')} parameters`, () => {
      const plan = planSynthGguf(name, { type: 'q4_0', seed: 0 })
      const total = plan.tensors.reduce((sum, t) => sum + t.shape.reduce((a, b) => a * b, 1), 0)
      expect(total).toBe(count)
      expect(plan.notices).toEqual([]) // every real width is a multiple of 32
      expect(plan.tensors.some((t) => t.name === 'output.weight')).toBe(!SYNTH_SHAPES[name]!.tiedEmbeddings)
    })
  }
  it('qwen2.5-0.5b has Q/K/V biases (f32) and the qwen2 architecture', () => {
    const plan = planSynthGguf('qwen2.5-0.5b', { type: 'q8_0', seed: 0 })
    expect(new Map(plan.metadata).get('general.architecture')).toBe('qwen2')
    const bias = plan.tensors.find((t) => t.name === 'blk.23.attn_k.bias')!
    expect(bias).toMatchObject({ dtype: 'f32', shape: [128] })
    expect(plan.tensors.find((t) => t.name === 'blk.0.attn_q.weight')).toMatchObject({ dtype: 'q8_0', shape: [896, 896] })
  })
  it('refuses unknown shapes and bad seeds', () => {
    expect(() => planSynthGguf('gpt-5', { type: 'f16', seed: 0 })).toThrow(/unknown shape "gpt-5", expected one of tinyllama-1.1b/)
    expect(() => planSynthGguf('test-llama', { type: 'f16', seed: -1 })).toThrow(RangeError)
  })
})

describe('synthetic weights', () => {
  it('are uniform with standard deviation 0.02 and mean 0; norms are 1; bytes depend only on the seed', async () => {
    const plan = planSynthGguf('test-llama', { type: 'f32', seed: 42 })
    const gate = plan.tensors.find((t) => t.name === 'blk.0.ffn_gate.weight')!
    const values = decodeToF32('f32', await collect(gate), 128 * 64)
    let sum = 0
    let sq = 0
    let maxAbs = 0
    for (const v of values) {
      sum += v
      sq += v * v
      maxAbs = Math.max(maxAbs, Math.abs(v))
    }
    const mean = sum / values.length
    const std = Math.sqrt(sq / values.length - mean * mean)
    expect(Math.abs(mean)).toBeLessThan(0.001)
    expect(std).toBeGreaterThan(0.019)
    expect(std).toBeLessThan(0.021)
    expect(maxAbs).toBeLessThanOrEqual(0.02 * Math.sqrt(3))
    const norm = plan.tensors.find((t) => t.name === 'blk.1.ffn_norm.weight')!
    expect(decodeToF32('f32', await collect(norm), 64)).toEqual(new Float32Array(64).fill(1))
    // Same seed → same bytes; another seed or another tensor → different bytes.
    const again = planSynthGguf('test-llama', { type: 'f32', seed: 42 }).tensors.find((t) => t.name === gate.name)!
    expect(await collect(again)).toEqual(await collect(gate))
    const other = planSynthGguf('test-llama', { type: 'f32', seed: 43 }).tensors.find((t) => t.name === gate.name)!
    expect(await collect(other)).not.toEqual(await collect(gate))
    const up = plan.tensors.find((t) => t.name === 'blk.0.ffn_up.weight')!
    expect(await collect(up)).not.toEqual(await collect(gate))
  })
})

describe('synthVocabulary', () => {
  it('has exactly vocabSize unique pieces: specials, 256 bytes, then pieces with descending scores', () => {
    const vocab = synthVocabulary(32000)
    expect(vocab.tokens).toHaveLength(32000)
    expect(new Set(vocab.tokens).size).toBe(32000)
    expect(vocab.tokens.slice(0, 4)).toEqual(['<unk>', '<s>', '</s>', '<0x00>'])
    expect(vocab.tokens[258]).toBe('<0xFF>')
    expect(vocab.tokens[259]).toBe('\u2581')
    expect([vocab.bosId, vocab.eosId]).toEqual([1, 2])
    for (let id = 260; id < 32000; id++) expect(vocab.scores[id]!).toBeLessThan(vocab.scores[id - 1]!)
    expect(synthVocabulary(MIN_SYNTH_VOCAB).tokens).toHaveLength(MIN_SYNTH_VOCAB)
    expect(() => synthVocabulary(MIN_SYNTH_VOCAB - 1)).toThrow(RangeError)
    expect(synthVocabulary(151936).tokens).toHaveLength(151936)
  })

  it('lets the master tokenizer encode any prompt and decode it back', () => {
    const tok = new SpmTokenizer(synthVocabulary(512))
    for (const text of ['Once upon a time', 'the cat sat', 'Grüße, 世界! 🙂\n\ttabs', '']) {
      const ids = tok.encode(text)
      expect(ids[0]).toBe(1)
      expect(ids.every((id) => id >= 0 && id < 512)).toBe(true)
      // pieceBytes drops the dummy-prefix space after BOS.
      const bytes = Buffer.concat(ids.slice(1).map((id, i) => tok.pieceBytes(ids[i]!, id)))
      expect(bytes.toString('utf8')).toBe(text)
    }
    // Merges happen: a common word is fewer tokens than characters.
    expect(tok.encode('the cat').length).toBeLessThan(1 + 1 + 7)
  })
})
