import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { Cluster } from '../../agent/cluster.ts'
import { argmax } from '../../agent/sampler.ts'
import { loadModel } from '../../splitter/index.ts'
import { HAVE_MODELS, MODELS_DIR, referenceCases, runCli } from '../support/cli.ts'

// Teacher-forced top-1 agreement of quantized stories260K with the F32 model: every reference sequence (prompt and
// reference continuation) is fed in one pass, and the argmax at each position is compared. The quantized weights run
// through onnxruntime's MatMulNBits (Q4_0/Q8_0 blocks re-laid out, not re-quantized).
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-agree-'))
const VOCAB = 512

async function argmaxes(path: string, quantizedMatmul: 'exact' | 'int8' = 'exact'): Promise<number[][]> {
  const model = loadModel(path)
  const cluster = await Cluster.start({ ...model, config: { ...model.config, maxSeqLen: 512 } }, { workers: [], threads: 1, quantizedMatmul })
  try {
    const out: number[][] = []
    for (const c of referenceCases()) {
      await cluster.reset()
      const tokens = [...c.prompt_tokens.slice(0, 1), ...c.next_tokens.slice(0, -1)]
      const logits = await cluster.forward(tokens, true)
      out.push(tokens.map((_, p) => argmax(logits.subarray(p * VOCAB, (p + 1) * VOCAB))))
    }
    return out
  } finally {
    await cluster.stop()
  }
}

describe.skipIf(!HAVE_MODELS)('quantized stories260K vs F32 (teacher forced)', () => {
  it('Q8_0 agrees on ≥ 98 % of positions; Q4_0 and int8-activation agreement are reported', async () => {
    const reference = await argmaxes(join(MODELS_DIR, 'stories260K.gguf'))
    const agreement: Record<string, number> = {}
    for (const [type, matmul] of [['q8_0', 'exact'], ['q4_0', 'exact'], ['q8_0', 'int8'], ['q4_0', 'int8']] as const) {
      const path = join(dir, `stories260K-${type}.gguf`)
      if (matmul === 'exact') {
        const q = await runCli(['quantize', join(MODELS_DIR, 'stories260K.gguf'), path, '--type', type, '--quiet'])
        expect(q.code).toBe(0)
      }
      const got = await argmaxes(path, matmul)
      let same = 0
      let total = 0
      for (const [i, ref] of reference.entries()) {
        for (const [p, t] of ref.entries()) {
          total++
          if (got[i]![p] === t) same++
        }
      }
      agreement[`${type} ${matmul}`] = same / total
    }
    console.log(`teacher-forced top-1 agreement with F32 over ${reference.flat().length} positions: ${JSON.stringify(agreement)}`)
    expect(agreement['q8_0 exact']).toBeGreaterThanOrEqual(0.98)
    expect(agreement['q4_0 exact']).toBeGreaterThan(0.5)
    // int8 activations (--quantized-matmul int8, llama.cpp's arithmetic) change numerics: measured and bounded here.
    expect(agreement['q8_0 int8']).toBeGreaterThanOrEqual(0.95)
    expect(agreement['q4_0 int8']).toBeGreaterThan(0.5)
  }, 120_000)
})
