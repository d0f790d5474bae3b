/**
 * Recovery time after a worker is lost: `run --peers 4` on stories260K and on the TinyLlama-1.1B shape
 * Q4_0 (synthetic), worker 2 killed with SIGKILL mid-generation (and, on stories260K, stopped with SIGSTOP), with both
 * strategies (`--recovery adopt`: the master takes the lost shard over; `even`: re-plan and re-send every shard). For
 * each run: detection (from the signal to the master declaring the worker lost, wall clock), then the master's phases
 * (survivors aborting, re-planning, re-sharding and loading, re-running the sequence so far plus the failed pass), the
 * total from the signal to the failed pass's logits, decode ms/token afterwards, and how many tokens equal an
 * undisturbed run's (all of them on stories260K; the synthetic model's random weights give near-tied logits, so any
 * change in the arithmetic, even 3 instead of 4 peers without a failure, changes its greedy tokens after a while).
 * Prints JSON.
 * `npm run bench:recovery [-- --repeats 3 --models stories,tinyllama]`.
 */
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { cpus, loadavg } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { BENCH_DIR, CLI, synthModel } from './support.ts'

const { values } = parseArgs({
  options: {
    repeats: { type: 'string', default: '3' },
    models: { type: 'string', default: 'stories,tinyllama' },
    'peer-deadline': { type: 'string', default: '2000' },
  },
})

interface Recovery {
  lost: { device: number; kind: string; silentMs: number; detectedAtMs: number }[]
  peers: number
  positions: number
  detectMs: number
  abortMs: number
  replanMs: number
  reshardMs: number
  rebuildMs: number
  totalMs: number
}
interface Summary {
  nextTokens: number[]
  recoveries: Recovery[]
  msPerToken: number
  loadAverage: number
}

/** Positions at which `a` and `b` agree before they first differ. */
const matching = (a: readonly number[], b: readonly number[]): number => {
  let i = 0
  while (i < a.length && i < b.length && a[i] === b[i]) i++
  return i
}
const median = (xs: readonly number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

/** `edgeshard run ...args` with `signal` sent to worker 2 once `afterBytes` of text are out; the summary and when. */
function runWithFault(args: readonly string[], signal: NodeJS.Signals | null, afterBytes: number, tag: string): Promise<{ summary: Summary; signalAtMs: number }> {
  const summaryPath = join(BENCH_DIR, `recovery-${tag}.json`)
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, 'run', ...args, '--summary-json', summaryPath], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    let text = 0
    let signalAtMs = 0
    let pid = 0
    child.stderr.on('data', (b: Buffer) => {
      stderr += b.toString()
      pid ||= Number(/worker 2 ready: .* \(pid (\d+)\)/.exec(stderr)?.[1] ?? 0)
    })
    child.stdout.on('data', (b: Buffer) => {
      text += b.length
      if (signal && signalAtMs === 0 && pid > 0 && text >= afterBytes) {
        signalAtMs = Date.now()
        process.kill(pid, signal)
      }
    })
    child.on('exit', (code) => {
      if (signal === 'SIGSTOP' && pid > 0) {
        try {
          process.kill(pid, 'SIGKILL') // normally gone already: the master kills a lost local worker
        } catch {}
      }
      if (code !== 0) return reject(new Error(`edgeshard run ${args.join(' ')} exited with ${code}: ${stderr.trim().split('\n').at(-1)}`))
      if (signal && signalAtMs === 0) return reject(new Error(`generation ended before ${afterBytes} bytes of text: nothing was signalled`))
      resolve({ summary: JSON.parse(readFileSync(summaryPath, 'utf8')) as Summary, signalAtMs })
    })
  })
}

interface ModelCase {
  readonly name: string
  readonly args: readonly string[]
  /** Text bytes out before the signal (past the echoed prompt). */
  readonly afterBytes: number
  readonly variants: readonly { readonly signal: NodeJS.Signals; readonly recovery: 'adopt' | 'even' }[]
}

const cases: ModelCase[] = []
const wanted = new Set(values.models.split(','))
if (wanted.has('stories')) {
  const model = fileURLToPath(new URL('../../shared/models/stories260K.bin', import.meta.url))
  if (!existsSync(model)) {
    console.error(`bench: ${model} not found`)
    process.exit(2)
  }
  cases.push({ name: 'stories260K', args: ['--model', model, '--prompt', 'Once upon a time', '--max-tokens', '196'], afterBytes: 300, variants: [{ signal: 'SIGKILL', recovery: 'adopt' }, { signal: 'SIGKILL', recovery: 'even' }, { signal: 'SIGSTOP', recovery: 'adopt' }] })
}
if (wanted.has('tinyllama')) {
  const model = synthModel('tinyllama-1.1b', 'q4_0')
  const prompt = 'The little robot walked along the quiet river and counted the stones one by one.'
  cases.push({ name: 'tinyllama-1.1b q4_0 (synthetic)', args: ['--model', model, '--prompt', prompt, '--max-tokens', '48', '--context', '512'], afterBytes: prompt.length + 60, variants: [{ signal: 'SIGKILL', recovery: 'adopt' }, { signal: 'SIGKILL', recovery: 'even' }] })
}

/** One recovered run: the phases in ms, and whether its tokens equal the undisturbed run's. */
interface RunRow {
  detectMs: number
  abortMs: number
  replanMs: number
  reshardMs: number
  rebuildMs: number
  rebuiltPositions: number
  totalMs: number
  /** Decode ms/token over the whole generation (recovery included) and the load average at the end. */
  msPerToken: number
  loadAverage: number
  masterRecoveryMs: number
  recoveries: number
  peersAfter: number
  sameTokens: boolean
  /** Generated positions whose token equals the undisturbed run's, before the first that does not. */
  matchingPositions: number
}

const results = []
for (const c of cases) {
  const args = [...c.args, '--peers', '4', '--temperature', '0', '--peer-deadline', values['peer-deadline']]
  // An undisturbed run: the tokens every recovered run must reproduce.
  const reference = await runWithFault(args, null, 0, `${c.name}-reference`.replace(/\W+/g, '-'))
  for (const { signal, recovery } of c.variants) {
    const runs: RunRow[] = []
    for (let r = 0; r < Number(values.repeats); r++) {
      const tag = `${c.name}-${signal}-${recovery}-${r}`.replace(/\W+/g, '-')
      const { summary, signalAtMs } = await runWithFault([...args, '--recovery', recovery], signal, c.afterBytes, tag)
      const rec = summary.recoveries[0]
      if (!rec) throw new Error(`${c.name}: no recovery recorded after ${signal}`)
      const detectedAt = Math.min(...rec.lost.map((l) => l.detectedAtMs))
      const detectMs = detectedAt - signalAtMs
      runs.push({
        detectMs,
        abortMs: rec.abortMs,
        replanMs: rec.replanMs,
        reshardMs: rec.reshardMs,
        rebuildMs: rec.rebuildMs,
        rebuiltPositions: rec.positions,
        // From the signal to the failed pass's logits: detection, plus the master's recovery after it.
        totalMs: detectMs + rec.abortMs + rec.replanMs + rec.reshardMs + rec.rebuildMs,
        msPerToken: summary.msPerToken,
        loadAverage: summary.loadAverage,
        masterRecoveryMs: rec.totalMs,
        recoveries: summary.recoveries.length,
        peersAfter: rec.peers,
        sameTokens: JSON.stringify(summary.nextTokens) === JSON.stringify(reference.summary.nextTokens),
        matchingPositions: matching(summary.nextTokens, reference.summary.nextTokens),
      })
    }
    const phase = (k: 'detectMs' | 'abortMs' | 'replanMs' | 'reshardMs' | 'rebuildMs' | 'totalMs'): number => median(runs.map((x) => x[k]))
    results.push({
      model: c.name,
      peers: 4,
      signal,
      recovery,
      median: {
        detectMs: phase('detectMs'),
        abortMs: phase('abortMs'),
        replanMs: phase('replanMs'),
        reshardMs: phase('reshardMs'),
        rebuildMs: phase('rebuildMs'),
        totalMs: phase('totalMs'),
      },
      decodeMsPerTokenUndisturbed: reference.summary.msPerToken,
      runs,
    })
  }
}
const git = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).stdout.trim()
console.log(
  JSON.stringify(
    { bench: 'recovery', peerDeadlineMs: Number(values['peer-deadline']), cpus: cpus().length, loadAverage: loadavg(), node: process.version, commit: git, results },
    null,
    2,
  ),
)
