import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type ReferenceCase, referenceCases, runCli } from '../../support/cli.ts'
import { buildSafetensors, tinyHfTensors, writeStoriesHfFolder, writeTinyHfFolder } from './hf-fixture.ts'
import { HAVE_MODELS, SKIP_REASON, STORIES_BIN, TOK512 } from './models-dir.ts'

// `edgeshard run` on Hugging Face folders written by the test from stories260K.bin + tok512.bin: real processes over
// libp2p, greedy tokens compared with llama2.c's reference.
if (!HAVE_MODELS) console.warn(SKIP_REASON)
const cases = referenceCases()
const VOCAB = 512
let root: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'edgeshard-hf-cli-'))
})
afterAll(() => rmSync(root, { recursive: true, force: true }))

interface Run {
  promptTokens: number[]
  nextTokens: number[]
  stdout: string
  logits?: Float32Array
}

async function generate(dir: string, peers: number, c: ReferenceCase, tag: string, logits = false): Promise<Run> {
  const summary = join(root, `${tag}.json`)
  const dump = join(root, `${tag}.f32`)
  const r = await runCli([
    'run',
    '--model', dir,
    '--prompt', c.prompt,
    '--peers', String(peers),
    '--max-tokens', String(c.steps - c.prompt_tokens.length + 1),
    '--temperature', '0',
    '--summary-json', summary,
    ...(logits ? ['--dump-logits', dump] : []),
  ])
  expect(r.stderr).not.toMatch(/Error:|at .*\.ts:\d+/)
  expect(r.code, r.stderr).toBe(0)
  const s = JSON.parse(readFileSync(summary, 'utf8')) as Run
  const out: Run = { promptTokens: s.promptTokens, nextTokens: s.nextTokens, stdout: r.stdout.toString('utf8') }
  if (logits) {
    const b = readFileSync(dump)
    out.logits = new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4)
  }
  return out
}

/** Index of the first token where `a` and `b` differ, or -1. */
function firstDifference(a: readonly number[], b: readonly number[]): number {
  for (let i = 0; i < Math.max(a.length, b.length); i++) if (a[i] !== b[i]) return i
  return -1
}

describe.skipIf(!HAVE_MODELS)('edgeshard run on a Hugging Face folder (F32, one model.safetensors)', () => {
  let dir: string
  beforeAll(() => {
    dir = writeStoriesHfFolder(join(root, 'f32'), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype: 'F32', shards: 1 })
  })
  // N=1 runs every case; N=3 (two local workers, slower) the first and the third.
  for (const [peers, which] of [
    [1, [0, 1, 2, 3]],
    [3, [0, 2]],
  ] as const) {
    it(`N=${peers}: reference cases ${which.join(', ')} give llama2.c's tokens and text`, async () => {
      for (const index of which) {
        const c = cases[index]!
        const run = await generate(dir, peers, c, `f32-${peers}-${index}`)
        expect(run.promptTokens).toEqual(c.prompt_tokens)
        expect(run.nextTokens).toEqual(c.next_tokens)
        expect(run.stdout).toBe(c.stdout)
      }
    }, 180_000)
  }
})

describe.skipIf(!HAVE_MODELS)('edgeshard run on sharded F16 / BF16 Hugging Face folders', () => {
  it('F16 in two shards, N=1: the reference tokens', async () => {
    const dir = writeStoriesHfFolder(join(root, 'f16'), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype: 'F16', shards: 2 })
    for (const [index, c] of cases.entries()) {
      const run = await generate(dir, 1, c, `f16-${index}`)
      expect(run.nextTokens).toEqual(c.next_tokens)
    }
  }, 180_000)

  it('BF16 in two shards, N=1: the reference tokens, or a first departure where the F32 top two are a near tie', async () => {
    const bf16 = writeStoriesHfFolder(join(root, 'bf16'), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype: 'BF16', shards: 2 })
    const f32 = writeStoriesHfFolder(join(root, 'f32-ref'), { bin: STORIES_BIN, tokenizerBin: TOK512 }, { dtype: 'F32', shards: 1 })
    const report: string[] = []
    for (const [index, c] of cases.entries()) {
      const run = await generate(bf16, 1, c, `bf16-${index}`)
      expect(run.promptTokens).toEqual(c.prompt_tokens)
      const at = firstDifference(run.nextTokens, c.next_tokens)
      if (at < 0) {
        report.push(`case ${index}: all ${c.next_tokens.length} tokens match`)
        continue
      }
      // At position `at` the F32 model chose next_tokens[at]; bf16 rounding (8-bit mantissa) may flip a near tie.
      const ref = await generate(f32, 1, c, `f32-ref-${index}`, true)
      const row = Array.from(ref.logits!.subarray(at * VOCAB, (at + 1) * VOCAB))
      const sorted = [...row].sort((x, y) => y - x)
      const margin = sorted[0]! - sorted[1]!
      report.push(
        `case ${index}: first departure at position ${at} of ${c.next_tokens.length} ` +
          `(${c.next_tokens[at]} → ${run.nextTokens[at]}), F32 top-2 logit margin there ${margin.toFixed(4)}`,
      )
      expect(at).toBeGreaterThanOrEqual(c.prompt_tokens.length - 1)
      expect(margin).toBeLessThan(0.05)
      expect(run.nextTokens[at]).toBe(row.indexOf(sorted[1]!)) // bf16 picked F32's runner-up
    }
    console.log(`BF16 vs reference:\n  ${report.join('\n  ')}`)
  }, 180_000)
})

describe('edgeshard run refuses malformed Hugging Face folders with one line and exit code 2', () => {
  async function expectInputError(dir: string, ...mentions: string[]): Promise<void> {
    const r = await runCli(['run', '--model', dir, '--peers', '2'])
    expect(r.code).toBe(2)
    const lines = r.stderr.trimEnd().split('\n')
    expect(lines).toHaveLength(1)
    expect(lines[0]).toMatch(/^edgeshard: /)
    for (const m of mentions) expect(lines[0]).toContain(m)
    expect(r.stderr).not.toMatch(/\n\s+at |starting \d+ local worker/)
    expect(r.stdout.length).toBe(0)
  }
  const good = () => buildSafetensors(tinyHfTensors())

  it('a bad header (wrong magic), truncated data, an unknown dtype, a size mismatch, a missing tokenizer.json', async () => {
    const notSt = writeTinyHfFolder(join(root, 'bad-magic'), { 'model.safetensors': Buffer.concat([Buffer.from('GGUF'), Buffer.alloc(60)]) })
    await expectInputError(notSt, join(notSt, 'model.safetensors'), 'header length at offset 0')

    const g = good()
    const cut = writeTinyHfFolder(join(root, 'cut'), { 'model.safetensors': g.subarray(0, g.byteLength - 4) })
    await expectInputError(cut, join(cut, 'model.safetensors'), 'tensor lm_head.weight', 'at offset', 'truncated')

    const retyped = buildSafetensors(tinyHfTensors(), (h) => ({
      ...h,
      'model.norm.weight': { ...(h['model.norm.weight'] as object), dtype: 'Q4' },
    }))
    const dtype = writeTinyHfFolder(join(root, 'dtype'), { 'model.safetensors': retyped })
    await expectInputError(dtype, join(dtype, 'model.safetensors'), 'tensor model.norm.weight', 'at offset', 'unknown dtype "Q4"')

    const reshaped = buildSafetensors(tinyHfTensors(), (h) => ({
      ...h,
      'model.norm.weight': { ...(h['model.norm.weight'] as object), shape: [5] },
    }))
    const shape = writeTinyHfFolder(join(root, 'shape'), { 'model.safetensors': reshaped })
    await expectInputError(shape, join(shape, 'model.safetensors'), 'tensor model.norm.weight', 'at offset', 'needs 20 bytes, data_offsets give 16')

    const noTok = writeTinyHfFolder(join(root, 'no-tok'), { 'tokenizer.json': null })
    await expectInputError(noTok, join(noTok, 'tokenizer.json'), 'no such file')
  }, 60_000)

  it('a GGUF whose tensor type is not supported, and a gpt2 vocabulary without merges', async () => {
    const { buildGguf, tinyLlamaKvs, tinyLlamaTensors } = await import('./gguf-fixture.ts')
    const path = join(root, 'q4k.gguf')
    const tensors = tinyLlamaTensors('f32').map((t) => (t.name === 'blk.0.ffn_up.weight' ? { ...t, ggmlType: 12 } : t))
    writeFileSync(path, buildGguf({ kvs: tinyLlamaKvs(), tensors }))
    await expectInputError(path, path, 'tensor blk.0.ffn_up.weight has GGML type 12 (Q4_K)')
    const gpt2 = join(root, 'gpt2.gguf')
    writeFileSync(gpt2, buildGguf({ kvs: tinyLlamaKvs({ tokenizerModel: 'gpt2' }), tensors: tinyLlamaTensors('f32') }))
    await expectInputError(gpt2, gpt2, 'tokenizer.ggml.merges is missing')
  }, 60_000)
})
