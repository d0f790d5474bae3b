import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, describe, expect, it } from 'vitest'
import type { ClusterPlan } from '../../../splitter/index.ts'
import { HAVE_MODELS, MODELS_DIR, runCli } from '../../support/cli.ts'

const MODEL = `${MODELS_DIR}stories260K.bin`
const EXAMPLES = fileURLToPath(new URL('../../../devices/examples/', import.meta.url))
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-plan-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

/**
 * Four equal devices whose 1 MB budgets cannot hold stories260K (0.9 MB of weights + 0.8 MB of KV cache) alone. They
 * read weights at 0.05 GB/s so that compute weighs as it does for a real model on real devices (3.6 ms per layer).
 */
function smallCluster(file: string, rttMs: number): string {
  const profile = { memoryBytes: 4e6, cores: 1, decodeGBs: 0.05, prefillGflops: 1, diskReadMBs: 100 }
  const path = join(dir, file)
  writeFileSync(
    path,
    JSON.stringify({
      devices: ['m', 'w1', 'w2', 'w3'].map((name) => ({ name, profile, memoryBudget: '1MB' })),
      links: { default: { rttMs, mbps: 1000 } },
    }),
  )
  return path
}

interface PlanJson {
  chosen: { label: string; plan: ClusterPlan }
  alternatives: { label: string; kind: string; predictedMsPerToken: number; stages: { layers: { start: number; count: number }; devices: string[] }[] }[]
  reasons: string[]
}

async function planJson(cluster: string): Promise<PlanJson> {
  const result = await runCli(['plan', '--model', MODEL, '--cluster', cluster, '--json'])
  expect(result.stderr).toBe('')
  expect(result.code).toBe(0)
  return JSON.parse(result.stdout.toString('utf8')) as PlanJson
}

function expectCovers(plan: ClusterPlan, nLayers: number): void {
  let next = 0
  for (const s of plan.stages) {
    expect(s.layers.start).toBe(next)
    next += s.layers.count
  }
  expect(next).toBe(nLayers)
}

describe.runIf(HAVE_MODELS)('edgeshard plan', () => {
  it('prints the chosen plan, the alternatives with predicted ms/token, and why', async () => {
    const result = await runCli(['plan', '--model', MODEL, '--cluster', `${EXAMPLES}pi-cluster.json`])
    expect(result.code).toBe(0)
    const text = result.stdout.toString('utf8')
    expect(text).toMatch(/^stories260K\.bin: 5 layers, dim 64, 8 heads \/ 4 KV heads, FFN 172, f32, context 512; 4 devices \(pi-cluster\.json, master laptop\)\n/)
    // stories260K is tiny: the laptop alone beats any split over gigabit Ethernet.
    expect(text).toContain('chosen: tensor-parallel, ')
    expect(text).toContain('  stage 1: layers 0–4 (5), one device\n    laptop  KV heads 0–3 (query heads 0–7), FFN columns 0–171 (172); ')
    expect(text).toMatch(/\n {2}\* +[\d.]+ {2}tensor-parallel over laptop {2}\(/)
    expect(text).toMatch(/\n {4,}[\d.]+ {2}tensor-parallel, even split, over laptop, pi5, pi4-a, pi4-b/)
    expect(text).toMatch(/\nexcluded:\n {2}pi5: too slow to help: /)
    expect(text).toMatch(/\nwhy:\n {2}chose tensor-parallel over laptop: [\d.]+ ms\/token predicted/)
  })

  it('chooses a pipeline over 5 ms links and tensor parallelism over 0.1 ms links (--json)', async () => {
    const slow = await planJson(smallCluster('slow.json', 5))
    expect(slow.chosen.plan.kind).toBe('pipeline')
    expect(slow.chosen.plan.stages.length).toBeGreaterThan(1)
    expectCovers(slow.chosen.plan, 5)
    const fast = await planJson(smallCluster('fast.json', 0.1))
    expect(fast.chosen.plan.kind).toBe('tensor-parallel')
    expect(fast.chosen.plan.stages[0]!.devices).toEqual([0, 1, 2, 3])
    expect(fast.chosen.plan.stages[0]!.tensorParallel.shards.map((s) => s.kvHeads.count)).toEqual([1, 1, 1, 1])
    for (const choice of [slow, fast]) {
      expect(choice.alternatives[0]!.label).toBe(choice.chosen.label)
      const ms = choice.alternatives.map((a) => a.predictedMsPerToken)
      expect(ms).toEqual([...ms].sort((a, b) => a - b))
      expect(choice.reasons[0]).toMatch(/^chose /)
    }
  })

  it('refuses bad input with one line and exit code 2', async () => {
    const broken = join(dir, 'broken.json')
    writeFileSync(broken, JSON.stringify({ devices: [{ name: 'a', profile: 'pi9' }] }))
    const bad = await runCli(['plan', '--model', MODEL, '--cluster', broken])
    expect(bad.code).toBe(2)
    expect(bad.stderr).toMatch(/^edgeshard: cannot read cluster file .*broken\.json: devices\[0\]\.profile: expected a known profile \(.*\) or an object, got "pi9"\n$/)

    const tiny = join(dir, 'tiny.json')
    writeFileSync(tiny, JSON.stringify({ devices: [{ name: 'pi-a', profile: 'raspberry-pi-4b', memoryBudget: '500KB' }] }))
    const short = await runCli(['plan', '--model', MODEL, '--cluster', tiny])
    expect(short.code).toBe(2)
    expect(short.stderr).toMatch(/^edgeshard: cannot fit the model on device pi-a: it needs \d+ bytes .*, its budget is 500000 bytes \(488\.3 KiB\): \d+ bytes \(.*\) lacking\n$/)

    const missing = await runCli(['plan', '--model', MODEL])
    expect(missing.code).toBe(2)
    expect(missing.stderr).toContain("required option '--cluster <file>' not specified")

    const noModel = await runCli(['plan', '--model', join(dir, 'nope.bin'), '--cluster', `${EXAMPLES}pi-cluster.json`])
    expect(noModel.code).toBe(2)
    expect(noModel.stderr).toMatch(/^edgeshard: cannot load model .*nope\.bin/)
  })
})
