import { existsSync, mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { HAVE_MODELS, MODELS_DIR, referenceCases, runCli, startAgent } from '../support/cli.ts'

// Sliding-window weight streaming (TPI-LLM §3.3) on real processes: a budget that leaves room for two half-layer
// blocks plus the KV cache must give exactly the tokens of resident mode.
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-window-'))

interface PeerStats {
  window: number
  forwards: number
  ioWaitMs: number
}

describe.skipIf(!HAVE_MODELS)('sliding-window memory scheduler', () => {
  // Reference case 1: empty prompt, 64 steps. With a 64-position context the KV cache is small (98 kB for all 4 KV
  // heads); the budgets hold two blocks but not three: 1 peer, largest block 132 kB; 3 peers, largest block 44.8 kB.
  const c = referenceCases()[1]!
  for (const [peers, budget] of [[1, '400kB'], [3, '140kB']] as const) {
    it(`with a window of 2 blocks gives the reference tokens (N=${peers})`, async () => {
      const summary = join(dir, `w2-${peers}.json`)
      const r = await runCli([
        'run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--prompt', c.prompt, '--peers', String(peers),
        '--max-tokens', String(c.steps - c.prompt_tokens.length + 1), '--context', '64', '--memory-budget', budget,
        '--summary-json', summary,
      ])
      expect(r.code).toBe(0)
      const s = JSON.parse(readFileSync(summary, 'utf8')) as { nextTokens: number[]; perPeer: PeerStats[] }
      expect(s.nextTokens).toEqual(c.next_tokens)
      expect(r.stdout.toString('utf8')).toBe(c.stdout)
      expect(s.perPeer.map((p) => p.window)).toEqual(Array.from({ length: peers }, () => 2))
      expect(r.stderr).toMatch(/I\/O wait/)
    }, 120_000)
  }

  it('refuses a budget too small for two blocks and the KV cache, naming the bytes, exit code 2', async () => {
    const r = await runCli(['run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--peers', '1', '--context', '64', '--memory-budget', '60kB'])
    expect(r.code).toBe(2)
    expect(r.stderr.trim()).toBe('edgeshard: memory budget of 60000 bytes on master (device 0) is too small: needs 363008 (2 blocks of 132352 + KV cache 98304 at 64 positions)')
  }, 60_000)
})

describe('sliding window on a shard 4× the budget (synthetic model, real processes)', () => {
  it('keeps the worker peak RSS under budget + the runtime overhead it reports', async () => {
    const model = join(dir, 'stream.gguf')
    const synth = await runCli(['synth', '--shape', 'test-stream', '--type', 'f32', '--seed', '3', '--out', model, '--quiet'], { timeoutMs: 120_000 })
    expect(synth.code).toBe(0)
    const budgetBytes = 16_000_000
    const agent = await startAgent(30_000, ['--memory-budget', String(budgetBytes)])
    try {
      const summaryPath = join(dir, 'stream.json')
      const r = await runCli(
        ['run', '--model', model, '--workers', agent.address, '--context', '64', '--max-tokens', '6', '--temperature', '0', '--summary-json', summaryPath],
        { timeoutMs: 120_000 },
      )
      expect(r.code).toBe(0)
      const s = JSON.parse(readFileSync(summaryPath, 'utf8')) as { perPeer: (PeerStats & { overheadBytes: number; peakRssBytes: number })[] }
      const worker = s.perPeer[1]!
      // The worker's shard: half of 8 layers × 16 MiB of f32 weights.
      const shardBytes = 8 * 8 * 2 ** 20
      expect(shardBytes).toBeGreaterThanOrEqual(4 * budgetBytes)
      expect(worker.window).toBe(2)
      expect(worker.forwards).toBeGreaterThan(1)
      const status = readFileSync(`/proc/${agent.child.pid}/status`, 'utf8')
      const peakRss = Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024
      expect(worker.overheadBytes).toBeGreaterThan(0)
      expect(peakRss).toBeLessThan(budgetBytes + worker.overheadBytes)
    } finally {
      await agent.stop()
    }
  }, 240_000)
})

describe('sliding window over quantized weights (synthetic Q8_0 model, real processes)', () => {
  it('streams blockwise blocks with a window of 2 and gives the tokens of resident mode, prefill in row chunks', async () => {
    const model = join(dir, 'stream-q8.gguf')
    const synth = await runCli(['synth', '--shape', 'test-stream', '--type', 'q8_0', '--seed', '3', '--out', model, '--quiet'], { timeoutMs: 120_000 })
    expect(synth.code).toBe(0)
    // 70 prompt tokens: the int8 kernel takes 32 rows per run for this shape (4 MiB of [16, rows, 2048] int32), so
    // the prefill runs each block 3 times while it is resident.
    const prompt = 'the quick brown fox jumps over the lazy dog '.repeat(2)
    const run = async (label: string, extra: string[]) => {
      const summary = join(dir, `q8-${label}.json`)
      let pid = 0
      const r = await runCli(
        ['run', '--model', model, '--peers', '1', '--prompt', prompt, '--max-tokens', '8', '--context', '128', '--temperature', '0', '--summary-json', summary, ...extra],
        { timeoutMs: 120_000, onSpawn: (child) => (pid = child.pid!) },
      )
      expect(r.code).toBe(0)
      // The shard files of the default folder (and their blockwise copy) go with the run.
      expect(existsSync(join(tmpdir(), 'edgeshard-shards', `master-${pid}`))).toBe(false)
      return JSON.parse(readFileSync(summary, 'utf8')) as { promptTokens: number[]; nextTokens: number[]; perPeer: (PeerStats & { overheadBytes: number; peakRssBytes: number })[] }
    }
    const resident = await run('resident', [])
    // Blockwise blocks of 3.5 MB, KV cache 4.7 MB, kernel workspace 16.8 MB: 30 MB holds 2 blocks, not 3.
    const budgetBytes = 30_000_000
    const streamed = await run('streamed', ['--memory-budget', String(budgetBytes)])
    expect(resident.promptTokens.length).toBe(70)
    expect(resident.perPeer[0]!.window).toBe(16)
    expect(streamed.perPeer[0]!.window).toBe(2)
    expect(streamed.nextTokens).toEqual(resident.nextTokens)
    expect(streamed.perPeer[0]!.peakRssBytes).toBeLessThan(budgetBytes + streamed.perPeer[0]!.overheadBytes)
  }, 240_000)
})
