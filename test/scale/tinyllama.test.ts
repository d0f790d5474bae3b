import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { runCli } from '../support/cli.ts'

// A random-weight model with TinyLlama-1.1B's exact shapes in Q4_0 (620 MB, made here and removed after), run on 1
// and 2 peers: the weights go through MatMulNBits, the 2-peer plan cuts Q4_0 tensors on block boundaries.
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-scale-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('TinyLlama-1.1B shape, Q4_0 (synthetic)', () => {
  it('generates the same tokens on 1 and 2 peers, logits within 1e-3', async () => {
    const model = join(dir, 'tinyllama-q4_0.gguf')
    const synth = await runCli(['synth', '--shape', 'tinyllama-1.1b', '--type', 'q4_0', '--seed', '11', '--out', model, '--quiet'], { timeoutMs: 600_000 })
    expect(synth.code).toBe(0)
    const runs = []
    for (const peers of [1, 2]) {
      const tag = join(dir, `p${peers}`)
      const r = await runCli(
        ['run', '--model', model, '--peers', String(peers), '--prompt', 'Once upon a time', '--max-tokens', '6', '--context', '64',
          '--summary-json', `${tag}.json`, '--dump-logits', `${tag}.f32`],
        { timeoutMs: 600_000 },
      )
      expect(r.code).toBe(0)
      const bytes = readFileSync(`${tag}.f32`)
      runs.push({
        summary: JSON.parse(readFileSync(`${tag}.json`, 'utf8')) as { nextTokens: number[]; msPerToken: number },
        logits: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4),
      })
    }
    const [one, two] = runs as [(typeof runs)[0], (typeof runs)[0]]
    expect(two.summary.nextTokens).toEqual(one.summary.nextTokens)
    expect(two.logits.length).toBe(one.logits.length)
    let maxAbs = 0
    for (let i = 0; i < one.logits.length; i++) maxAbs = Math.max(maxAbs, Math.abs(one.logits[i]! - two.logits[i]!))
    expect(maxAbs).toBeLessThan(1e-3)
    console.log(`tinyllama q4_0: ms/token N=1 ${one.summary.msPerToken.toFixed(1)}, N=2 ${two.summary.msPerToken.toFixed(1)}`)
  })
})
