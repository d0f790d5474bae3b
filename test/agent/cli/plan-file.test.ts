/**
 * `--plan-file` and memory budgets checked before any process starts: a plan naming devices the cluster lacks, made
 * for other devices or another model, or asking more of a device than its budget can run, and budgets too small for
 * the RoPE tables or the KV cache, each end in one line naming the file or the device and the bytes, exit code 2.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { buildClusterPlan, loadModel, parseStageLayout } from '../../../splitter/index.ts'
import { HAVE_MODELS, MODELS_DIR, runCli } from '../../support/cli.ts'

const MODEL = `${MODELS_DIR}stories260K.bin`
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-plan-file-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

/** A cluster file of devices `names` (the first is the master), each with `budget` (the master's own if given), 1 ms links. */
function cluster(tag: string, names: readonly string[], budget: string, masterBudget = budget): string {
  const path = join(dir, `${tag}.cluster.json`)
  const devices = names.map((name, i) => ({ name, profile: 'laptop', memoryBudget: i === 0 ? masterBudget : budget }))
  writeFileSync(path, JSON.stringify({ devices, links: { default: { rttMs: 1, mbps: 1000 } } }))
  return path
}

/** A plan file as `edgeshard plan --json` writes it: the devices by name and the chosen plan (stage layout `layout`). */
function planFile(tag: string, layout: string, names: readonly string[], context?: number): string {
  const loaded = loadModel(MODEL)
  const config = context === undefined ? loaded.config : { ...loaded.config, maxSeqLen: context }
  const plan = buildClusterPlan(config, parseStageLayout(layout), names.length, { attentionBlock: 1, ffnBlock: 1 })
  const path = join(dir, `${tag}.plan.json`)
  writeFileSync(path, JSON.stringify({ devices: names.map((name) => ({ name })), chosen: { label: 'test', plan } }))
  return path
}

/** Runs `edgeshard ...args` and returns its only stderr line; it must exit with 2. */
async function refusal(args: readonly string[]): Promise<string> {
  const result = await runCli(args, { timeoutMs: 30_000 })
  const lines = result.stderr.trim().split('\n')
  expect(lines, result.stderr).toHaveLength(1)
  expect(result.code).toBe(2)
  return lines[0]!
}

describe.skipIf(!HAVE_MODELS)('--plan-file and memory budgets, checked before anything starts', () => {
  const four = ['m', 'w1', 'w2', 'w3']

  it('refuses a plan file naming a device the cluster lacks, or devices of another cluster', async () => {
    const plan = planFile('hybrid', '0+1:2,2+3:3', four)
    const three = cluster('three', ['m', 'w1', 'w2'], '1GiB')
    expect(await refusal(['emulate', '--cluster', three, '--model', MODEL, '--plan-file', plan, '--quiet'])).toBe(
      `edgeshard: plan file ${plan}: stage 1 runs on device 3 (w3), which does not exist: this cluster has 3 devices (0 = m, 1 = w1, 2 = w2)`,
    )
    const other = cluster('other', ['m', 'w1', 'pi', 'w3'], '1GiB')
    expect(await refusal(['emulate', '--cluster', other, '--model', MODEL, '--plan-file', plan, '--quiet'])).toBe(
      `edgeshard: plan file ${plan}: device 2 is "w2" in the plan but "pi" in this cluster, which has 4 devices (0 = m, 1 = w1, 2 = pi, 3 = w3)`,
    )
    // Without a cluster file only the number of devices is known.
    expect(await refusal(['run', '--model', MODEL, '--peers', '2', '--plan-file', plan, '--quiet'])).toBe(
      `edgeshard: plan file ${plan}: stage 1 runs on device 2 (w2), which does not exist: this cluster has 2 devices (the master and 1 worker)`,
    )
  }, 60_000)

  it('refuses a plan file made for another model, naming what differs', async () => {
    const plan = planFile('context', '0+1:2,2+3:3', four, 128)
    const same = cluster('same', four, '1GiB')
    expect(await refusal(['emulate', '--cluster', same, '--model', MODEL, '--plan-file', plan, '--quiet'])).toBe(
      `edgeshard: plan file ${plan}: cluster plan stage 0: the tensor-parallel plan is for another model (maxSeqLen 128, the model has 512)`,
    )
  }, 30_000)

  it('refuses a plan file asking more of a device than its budget can run, naming the file, the device and the bytes', async () => {
    const plan = planFile('pipeline', '0:1,1:1,2:1,3:2', four)
    // A layer is an attention block of 49 408 bytes and an FFN block of 132 352; the KV cache of 1 layer 262 144 bytes
    // (one more layer's worth for the copy made while appending). One layer fits 500 kB; w3's two (363 520 + 393 216)
    // do not, nor can they stream: 2 FFN blocks + the KV cache = 657 920.
    const small = cluster('small', four, '500kB')
    expect(await refusal(['emulate', '--cluster', small, '--model', MODEL, '--plan-file', plan, '--quiet'])).toBe(
      `edgeshard: plan file ${plan}: memory budget of 500000 bytes on w3 (device 3) is too small: needs 657920 (2 blocks of 132352 + KV cache 393216 at 512 positions)`,
    )
  }, 30_000)

  it('refuses budgets too small for the RoPE tables or the KV cache, naming the device and the bytes needed', async () => {
    // Even tensor parallelism over 4: a share is 1 KV head and 43 FFN columns per layer, blocks of 12 544 and 33 280 bytes,
    // KV cache 196 608 bytes; RoPE tables 2 × 512 × 8 × 4 = 32 768 bytes, which a worker keeps under a quarter of its budget.
    const tiny = cluster('tiny', four, '100kB', '2MB')
    expect(await refusal(['emulate', '--cluster', tiny, '--model', MODEL, '--plan', 'tp', '--quiet'])).toBe(
      'edgeshard: memory budget of 100000 bytes on w1 (device 1) is too small: its RoPE tables for a context of 512 × head size 8 need 32768 bytes, ' +
        'at most a quarter of the budget: needs 131072',
    )
    const small = cluster('small-kv', four, '200kB', '2MB')
    expect(await refusal(['emulate', '--cluster', small, '--model', MODEL, '--plan', 'tp', '--quiet'])).toBe(
      'edgeshard: memory budget of 200000 bytes on w1 (device 1) is too small: needs 263168 (2 blocks of 33280 + KV cache 196608 at 512 positions)',
    )
    // The master alone, as `run` checks it.
    expect(await refusal(['run', '--model', MODEL, '--peers', '1', '--context', '64', '--memory-budget', '60kB'])).toBe(
      'edgeshard: memory budget of 60000 bytes on master (device 0) is too small: needs 363008 (2 blocks of 132352 + KV cache 98304 at 64 positions)',
    )
  }, 30_000)
})
