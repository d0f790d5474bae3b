import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { runCli } from '../support/cli.ts'

// A random-weight model with TinyLlama-1.1B's exact shapes in Q4_0 (620 MB, made here and removed after), run on 1
// and 2 peers with exact and with int8 activations: the weights go through MatMulNBits, the 2-peer plan cuts Q4_0
// tensors on block boundaries, one peer runs whole-layer graphs.
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-scale-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('TinyLlama-1.1B shape, Q4_0 (synthetic)', () => {
  const model = join(dir, 'tinyllama-q4_0.gguf')
  const run = async (peers: number, mode: 'exact' | 'int8') => {
    const tag = join(dir, `p${peers}-${mode}`)
    const r = await runCli(
      ['run', '--model', model, '--peers', String(peers), '--prompt', 'Once upon a time', '--max-tokens', '6', '--context', '64',
        '--quantized-matmul', mode, '--summary-json', `${tag}.json`, '--dump-logits', `${tag}.f32`],
      { timeoutMs: 600_000 },
    )
    expect(r.code).toBe(0)
    const bytes = readFileSync(`${tag}.f32`)
    return {
      summary: JSON.parse(readFileSync(`${tag}.json`, 'utf8')) as { nextTokens: number[]; msPerToken: number },
      logits: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4),
    }
  }
  const maxAbsDiff = (a: Float32Array, b: Float32Array): number => {
    expect(b.length).toBe(a.length)
    let max = 0
    for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]! - b[i]!))
    return max
  }

  it('writes the model', async () => {
    const synth = await runCli(['synth', '--shape', 'tinyllama-1.1b', '--type', 'q4_0', '--seed', '11', '--out', model, '--quiet'], { timeoutMs: 600_000 })
    expect(synth.code).toBe(0)
  })

  it('exact activations: the same tokens on 1 and 2 peers, logits within 1e-3', async () => {
    const one = await run(1, 'exact')
    const two = await run(2, 'exact')
    expect(two.summary.nextTokens).toEqual(one.summary.nextTokens)
    expect(maxAbsDiff(one.logits, two.logits)).toBeLessThan(1e-3)
    console.log(`tinyllama q4_0 exact: ms/token N=1 ${one.summary.msPerToken.toFixed(1)}, N=2 ${two.summary.msPerToken.toFixed(1)}`)
  })

  it('int8 activations (the default): the same tokens on 1 and 2 peers, logits within int8 rounding', async () => {
    const one = await run(1, 'int8')
    const two = await run(2, 'int8')
    // Activations are quantized per row and 32-value block; summing partials in another order can move a value across
    // a rounding boundary of its block, and 22 layers of random weights carry that on: measured max 0.11.
    expect(two.summary.nextTokens).toEqual(one.summary.nextTokens)
    const diff = maxAbsDiff(one.logits, two.logits)
    expect(diff).toBeLessThan(0.25)
    console.log(`tinyllama q4_0 int8: ms/token N=1 ${one.summary.msPerToken.toFixed(1)}, N=2 ${two.summary.msPerToken.toFixed(1)}, logits max diff ${diff.toFixed(4)}`)
  })
})
