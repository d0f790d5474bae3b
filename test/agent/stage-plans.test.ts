/**
 * Pipeline and hybrid plans executed by real processes over libp2p on 127.0.0.1, directly (`run --plan`) and through
 * the cluster emulator (`emulate --cluster`: shaped links, CPU quotas, memory budgets). Greedy tokens and the printed
 * text must equal llama2.c's reference exactly whatever the plan.
 */
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { type MeasuredProfile, profileCacheKey, writeCachedProfile } from '../../agent/device-measure.ts'
import { plannedFor } from '../../agent/cli/plan.ts'
import { readClusterFile } from '../../devices/index.ts'
import { loadModel } from '../../splitter/index.ts'
import { HAVE_MODELS, MODELS_DIR, processAlive, referenceCases, runCli, runKillingWorker, waitFor } from '../support/cli.ts'

const cases = referenceCases()
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-stages-'))
const MODEL = join(MODELS_DIR, 'stories260K.bin')
/** CPU quotas are enforced here (root with a cgroup v1 cpu controller), else the emulator must say they are not. */
const CGROUP_CPU = process.getuid?.() === 0 && existsSync('/sys/fs/cgroup/cpu/cpu.cfs_quota_us')

interface Summary {
  promptTokens: number[]
  nextTokens: number[]
  clusterPlan: { kind: string; stages: { devices: number[]; layers: { start: number; count: number } }[] }
  perPeer: { forwards: number; window: number }[]
}

/** Runs `edgeshard <command> ... ` on reference case `index`; checks exit, tokens and text; returns the summary. */
async function generateCase(
  command: string,
  args: readonly string[],
  index: number,
  tag: string,
  env?: NodeJS.ProcessEnv,
): Promise<{ summary: Summary; stderr: string }> {
  const c = cases[index]!
  const summaryPath = join(dir, `${tag}-${index}.json`)
  const result = await runCli(
    [command, '--model', MODEL, '--prompt', c.prompt, '--max-tokens', String(c.steps - c.prompt_tokens.length + 1), '--temperature', '0', '--summary-json', summaryPath, ...args],
    { timeoutMs: 60_000, ...(env ? { env } : {}) },
  )
  expect(result.stderr).not.toMatch(/Error:|at .*\.ts:\d+/)
  expect(result.code).toBe(0)
  const summary = JSON.parse(readFileSync(summaryPath, 'utf8')) as Summary
  expect(summary.promptTokens).toEqual(c.prompt_tokens)
  expect(summary.nextTokens).toEqual(c.next_tokens)
  expect(result.stdout.toString('latin1')).toBe(Buffer.from(c.stdout, 'utf8').toString('latin1'))
  return { summary, stderr: result.stderr }
}

const stagesOf = (s: Summary): string[] => s.clusterPlan.stages.map((x) => `${x.devices.join('+')}@${x.layers.start}+${x.layers.count}`)

/**
 * A profile cache (agent/device-measure.ts) holding one measurement for this host unconstrained, `decodeGBs` f32 and
 * 4-bit, so every agent started without a CPU quota publishes it at once instead of measuring.
 */
function seededProfileCache(tag: string, decodeGBs: number): string {
  const path = join(dir, `${tag}.profile.json`)
  const capabilities = { memoryBytes: 8e9, cores: 2, decodeGBs, decodeNBitsGBs: decodeGBs, prefillGflops: 50, diskReadMBs: 500 }
  writeCachedProfile(path, { version: 2, key: profileCacheKey(), measuredAt: new Date().toISOString(), capabilities } as unknown as MeasuredProfile)
  return path
}

/** Writes a cluster file (devices[0] is the master). */
function clusterFile(tag: string, devices: readonly Record<string, unknown>[], links: Record<string, unknown>): string {
  const path = join(dir, `${tag}.cluster.json`)
  writeFileSync(path, JSON.stringify({ devices, links }))
  return path
}

describe.skipIf(!HAVE_MODELS)('pipeline and hybrid plans (real processes over libp2p)', () => {
  it('run --plan pipeline over 3 devices (layers 2/2/1) gives the reference tokens and text', async () => {
    const { summary, stderr } = await generateCase('run', ['--peers', '3', '--plan', 'pipeline'], 3, 'pipeline')
    expect(summary.clusterPlan.kind).toBe('pipeline')
    expect(stagesOf(summary)).toEqual(['0@0+2', '1@2+2', '2@4+1'])
    expect(stderr).toContain('pipeline: layers 0–1 on device 0; layers 2–3 on device 1; layer 4 on device 2')
    // every device ran every forward pass
    expect(new Set(summary.perPeer.map((p) => p.forwards)).size).toBe(1)
  }, 60_000)

  it('run --plan 0+1:2,2+3:3 (hybrid: worker 2 leads the second stage) and 1+2:3,3:2 (master in no stage) give the reference', async () => {
    const hybrid = await generateCase('run', ['--peers', '4', '--plan', '0+1:2,2+3:3'], 1, 'hybrid')
    expect(hybrid.summary.clusterPlan.kind).toBe('hybrid')
    expect(stagesOf(hybrid.summary)).toEqual(['0+1@0+2', '2+3@2+3'])
    const headless = await generateCase('run', ['--peers', '4', '--plan', '1+2:3,3:2'], 1, 'headless')
    expect(stagesOf(headless.summary)).toEqual(['1+2@0+3', '3@3+2'])
    expect(headless.summary.perPeer[0]!.window).toBe(0) // the master holds no layer
  }, 60_000)

  it('emulate with shaped links, CPU quotas and memory budgets: TP, pipeline and hybrid plans give the reference', async () => {
    const devices = [
      // Under the pipeline plan the master's 2 layers need 393 216 bytes of KV cache and 4 blocks of at most 132 352:
      // this budget holds 2 blocks, so it streams them through a sliding window of 2.
      { name: 'master', profile: 'laptop', cpu: 1, memoryBudget: '700KB' },
      { name: 'w1', profile: 'laptop', cpu: 1 },
      { name: 'w2', profile: 'laptop', cpu: 1 },
      { name: 'w3', profile: 'laptop', cpu: 1 },
    ]
    const file = clusterFile('emulated', devices, { default: { rttMs: 1, mbps: 1000 } })
    const pids: number[] = []
    for (const [plan, stages] of [
      ['tp', ['0+1+2+3@0+5']],
      ['pipeline', ['0@0+2', '1@2+1', '2@3+1', '3@4+1']],
      ['0+1:2,2+3:3', ['0+1@0+2', '2+3@2+3']],
    ] as const) {
      const { summary, stderr } = await generateCase('emulate', ['--cluster', file, '--plan', plan], 1, `emulate-${plan}`)
      expect(stagesOf(summary)).toEqual(stages)
      expect(stderr).toContain('link master ↔ w1: rtt 1 ms, 1000 Mbit/s')
      expect(stderr.includes('CPU is unconstrained')).toBe(!CGROUP_CPU)
      if (plan === 'pipeline') expect(summary.perPeer[0]!.window).toBe(2)
      pids.push(...[...stderr.matchAll(/\(pid (\d+)\)/g)].map((m) => Number(m[1])))
    }
    // cgroups are removed once the emulator is done
    if (CGROUP_CPU) expect(pids.every((pid) => !existsSync(`/sys/fs/cgroup/cpu/edgeshard-${pid}`))).toBe(true)
  }, 90_000)

  it('emulated links, master ↔ worker and worker ↔ worker, measure within 20 % of the cluster file; auto plans with them', async () => {
    const file = clusterFile(
      'links',
      [
        { name: 'm', profile: 'laptop' },
        { name: 'a', profile: 'laptop' },
        { name: 'b', profile: 'laptop' },
      ],
      {
        default: { rttMs: 1, mbps: 1000 },
        pairs: [
          { between: ['m', 'a'], rttMs: 20, mbps: 40 },
          { between: ['m', 'b'], rttMs: 30, mbps: 80 },
          { between: ['a', 'b'], rttMs: 15, mbps: 60 },
        ],
      },
    )
    const result = await runCli(['emulate', '--cluster', file, '--model', MODEL, '--plan', 'auto', '--max-tokens', '3', '--probe-links'], { timeoutMs: 60_000 })
    expect(result.code).toBe(0)
    const measured = [...result.stderr.matchAll(/link (\w+) → (\w+) measured: rtt ([\d.]+) ms \(emulated ([\d.]+)\), ([\d.]+) Mbit\/s \(emulated ([\d.]+)\)/g)]
    expect(measured.map((m) => `${m[1]}-${m[2]}`)).toEqual(['m-a', 'm-b', 'a-b'])
    for (const m of measured) {
      const [rtt, rttSet, mbps, mbpsSet] = [m[3], m[4], m[5], m[6]].map(Number) as [number, number, number, number]
      expect(Math.abs(rtt - rttSet) / rttSet, `${m[0]}`).toBeLessThan(0.2)
      expect(Math.abs(mbps - mbpsSet) / mbpsSet, `${m[0]}`).toBeLessThan(0.2)
    }
    expect(result.stderr).toContain('edgeshard: planned from the measured links')
  }, 60_000)

  it('run --plan auto plans from the agents\' published measurements and the links it measures, worker ↔ worker included', async () => {
    const cache = seededProfileCache('run-auto', 5)
    const { stderr } = await generateCase('run', ['--peers', '3', '--plan', 'auto'], 2, 'run-auto', { EDGESHARD_PROFILE_CACHE: cache })
    for (const [d, name] of ['master', 'worker-1', 'worker-2'].entries()) {
      expect(stderr).toMatch(new RegExp(`device ${d} \\(${name}\\) measured: decode 5\\.00 GB/s f32, 5\\.00 GB/s 4-bit, prefill 50 GFLOP/s`))
    }
    expect(stderr).toMatch(/link master → worker-1 measured: rtt [\d.]+ ms, [\d.]+ Mbit\/s/)
    expect(stderr).toMatch(/link worker-1 → worker-2 measured: rtt [\d.]+ ms, [\d.]+ Mbit\/s/)
    expect(stderr).toContain('edgeshard: planned from the measured profiles and links')
  }, 60_000)

  it('emulate --profiles measured plans from what the agents publish, not the cluster file\'s profiles', async () => {
    // The file calls the master hopelessly slow: planned on the file, the layers go to the worker.
    const file = clusterFile(
      'measured',
      [
        { name: 'slow', profile: { memoryBytes: 4e9, cores: 1, decodeGBs: 0.001, prefillGflops: 1, diskReadMBs: 50 } },
        { name: 'fast', profile: 'laptop' },
      ],
      { default: { rttMs: 1, mbps: 1000 } },
    )
    const nominal = plannedFor(readClusterFile(file), loadModel(MODEL))
    expect(nominal.stages.flatMap((s) => s.devices)).toContain(1)
    // Measured, both are this host: the master alone is fastest (no hand-offs).
    const cache = seededProfileCache('emulate-measured', 5)
    const { summary, stderr } = await generateCase('emulate', ['--cluster', file, '--profiles', 'measured'], 0, 'emulate-measured', { EDGESHARD_PROFILE_CACHE: cache })
    expect(stderr).toMatch(/device 0 \(slow\) measured: decode 5\.00 GB\/s f32/)
    expect(stderr).toMatch(/device 1 \(fast\) measured: decode 5\.00 GB\/s f32/)
    expect(stderr).toContain('edgeshard: planned from the measured profiles')
    expect(stagesOf(summary)).toEqual(['0@0+5'])
  }, 60_000)

  it('with --no-recover, a stage member killed mid-generation fails the run within 10 s naming it, leaving no process behind', async () => {
    const { result, killedAt, killedPid, peer, workers } = await runKillingWorker(
      ['run', '--model', MODEL, '--peers', '4', '--plan', '0+1:2,2+3:3', '--max-tokens', '400', '--temperature', '0.8', '--seed', '7', '--no-recover'],
      3,
    )
    expect(killedAt).toBeGreaterThan(0)
    expect(result.code).toBe(1)
    expect(Date.now() - killedAt).toBeLessThan(10_000)
    const last = result.stderr.trimEnd().split('\n').at(-1)!
    expect(last).toMatch(/^edgeshard: worker \d .*(went away|failed)/)
    expect(last).toContain(peer)
    expect(result.stderr).not.toMatch(/\n\s+at /)
    expect(workers).toContain(killedPid)
    expect(await waitFor(() => workers.every((pid) => !processAlive(pid)), 5_000)).toBe(true)
  }, 60_000)
})
