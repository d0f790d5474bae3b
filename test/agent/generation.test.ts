import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { HAVE_MODELS, MODELS_DIR, type RunningAgent, referenceCases, runCli, runWithLogits, startAgent } from '../support/cli.ts'

// Golden tests: real processes, real libp2p on 127.0.0.1, the real pretrained stories260K. Greedy tokens must equal
// llama2.c run.c's reference exactly, and the text printed must be byte-identical to what run.c printed.
// N=2 and 4 spawn their workers (`--peers N`); N=3 dials three long-running `edgeshard agent`s (`--workers`), which
// also shows that an agent serves one master after another.
const cases = referenceCases()
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-golden-'))
const models = ['stories260K.bin', 'stories260K.gguf']
const PEERS = [1, 2, 3, 4]
const VOCAB = 512

interface Summary {
  promptTokens: number[]
  nextTokens: number[]
}

let agents: RunningAgent[] = []
beforeAll(async () => {
  if (HAVE_MODELS) agents = await Promise.all([startAgent(), startAgent()])
})
afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop()))
})

async function generateCase(model: string, peers: number, index: number): Promise<{ summary: Summary; logits: Float32Array; stdout: Buffer }> {
  const c = cases[index]!
  return runWithLogits<Summary>(dir, `${model}-${peers}-${index}`, [
    '--model', join(MODELS_DIR, model),
    '--prompt', c.prompt,
    ...(peers === 3 ? ['--workers', agents.map((a) => a.address).join(',')] : ['--peers', String(peers)]),
    '--max-tokens', String(c.steps - c.prompt_tokens.length + 1),
    '--temperature', '0',
    // stories260K.gguf declares a context of 128 (llama.cpp's converter default); the model was trained on 512.
    '--context', '512',
  ])
}

describe.skipIf(!HAVE_MODELS)('stories260K across peers (real processes over libp2p)', () => {
  for (const model of models) {
    describe(model, () => {
      const single: Float32Array[] = []
      for (const peers of PEERS) {
        it(`N=${peers}: every reference case gives run.c's tokens and text${peers > 1 ? ', logits within 1e-4 of N=1' : ''}`, async () => {
          for (const [index, c] of cases.entries()) {
            const { summary, logits, stdout } = await generateCase(model, peers, index)
            expect(summary.promptTokens).toEqual(c.prompt_tokens)
            expect(summary.nextTokens).toEqual(c.next_tokens)
            expect(stdout.toString('latin1')).toBe(Buffer.from(c.stdout, 'utf8').toString('latin1'))
            // One row of logits per position fed: positions 0 .. next_tokens.length-1.
            expect(logits.length).toBe(c.next_tokens.length * VOCAB)
            if (peers === 1) {
              single[index] = logits
            } else {
              const ref = single[index]!
              let maxAbs = 0
              for (let i = 0; i < ref.length; i++) maxAbs = Math.max(maxAbs, Math.abs(ref[i]! - logits[i]!))
              expect(maxAbs).toBeLessThan(1e-4)
            }
          }
        }, 180_000)
      }
    })
  }
})

describe.skipIf(!HAVE_MODELS)('a run cut short by the context', () => {
  it('says so on stderr (even with --quiet) and in the summary: stories260K.gguf declares 128 positions', async () => {
    const summaryPath = join(dir, 'context-full.json')
    const r = await runCli(
      ['run', '--model', join(MODELS_DIR, 'stories260K.gguf'), '--peers', '1', '--prompt', 'Once upon a time', '--max-tokens', '196', '--temperature', '0', '--quiet', '--summary-json', summaryPath],
      { timeoutMs: 60_000 },
    )
    expect(r.code).toBe(0)
    // 5 prompt tokens (BOS included) + 123 generated fill 128 positions; the 124th token needs no position of its own.
    expect(r.stderr).toBe('edgeshard: stopped after 124 of 196 tokens: the context of 128 positions is full (the model declares 128; --context N sets it)\n')
    const summary = JSON.parse(readFileSync(summaryPath, 'utf8')) as { generated: number; stopReason: string }
    expect(summary).toMatchObject({ generated: 124, stopReason: 'context' })
  })
})
