/**
 * Must-show: real `edgeshard split serve` and `edgeshard split run` processes over libp2p on 127.0.0.1 classify real
 * Fashion-MNIST images with the result equal to the local run. Plus `split plan` and the one-line errors.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { predictions } from '../../../agent/split/profile.ts'
import { SplitModel } from '../../../agent/split/split-model.ts'
import { CLI, runCli } from '../../support/cli.ts'
import { BOTTLEFIT, FMNIST_MEAN, FMNIST_STD, fmnistItems, fmnistLabels, HAVE_FMNIST, maxAbsDiff, TEST_A, TEST_A_LABELS } from './split-helpers.ts'

const OFFSET = 40
const COUNT = 32
const INPUT_FLAGS = ['--model', BOTTLEFIT, '--input', TEST_A, '--mean', String(FMNIST_MEAN), '--std', String(FMNIST_STD), '--offset', String(OFFSET), '--count', String(COUNT)]

/** Parses `<item>\t<class>\t<label>` lines. */
function classes(stdout: Buffer): { item: number; cls: number; label: number }[] {
  return stdout
    .toString('utf8')
    .trim()
    .split('\n')
    .map((line) => {
      const [item, cls, label] = line.split('\t').map(Number)
      return { item: item!, cls: cls!, label: label! }
    })
}

describe.skipIf(!HAVE_FMNIST)('edgeshard split serve + split run as processes', () => {
  let server: ChildProcess | undefined
  let address = ''
  let local: Int32Array
  let localLogits: Float32Array
  const dir = mkdtempSync(join(tmpdir(), 'edgeshard-split-cli-'))

  beforeAll(async () => {
    // a fresh key: `split run` below reads this machine's default identity key
    const child = spawn(process.execPath, [CLI, 'split', 'serve', '--model', BOTTLEFIT, '--listen', '/ip4/127.0.0.1/tcp/0', '--no-identity'], { stdio: ['ignore', 'pipe', 'pipe'] })
    server = child
    address = await new Promise<string>((resolve, reject) => {
      let out = ''
      let err = ''
      child.stdout!.on('data', (b: Buffer) => {
        out += b.toString('utf8')
        const m = /^listening (\S+)$/m.exec(out)
        if (m) resolve(m[1]!)
      })
      child.stderr!.on('data', (b: Buffer) => {
        err += b.toString('utf8')
      })
      child.on('exit', (code) => reject(new Error(`split serve exited with ${code}: ${err}`)))
      setTimeout(() => reject(new Error(`split serve printed no address in 60 s: ${err}`)), 60_000)
    })
    const model = await SplitModel.load(BOTTLEFIT)
    const y = (await (await model.fullSession()).run({ input: fmnistItems(OFFSET, COUNT) })).logits!
    local = predictions(y, { kind: 'top1' })
    localLogits = Float32Array.from(y.data as Float32Array)
    await model.release()
  }, 90_000)

  afterAll(() => {
    if (server?.pid !== undefined && server.exitCode === null) server.kill('SIGTERM')
    rmSync(dir, { recursive: true, force: true })
  })

  it('f32 at the bottleneck: every class equals the local run and the logits agree within 1e-5', async () => {
    const dump = join(dir, 'f32.logits')
    const r = await runCli(['split', 'run', ...INPUT_FLAGS, '--server', address, '--cut', 'bottleneck', '--codec', 'f32', '--labels', TEST_A_LABELS, '--dump-outputs', dump])
    expect(r.stderr).toMatch(/32 items via #12 bottleneck f32: 800\.0 bytes\/item sent/)
    expect(r.code).toBe(0)
    const rows = classes(r.stdout)
    expect(rows.map((x) => x.item)).toEqual(Array.from({ length: COUNT }, (_, i) => OFFSET + i))
    expect(rows.map((x) => x.cls)).toEqual(Array.from(local))
    expect(rows.map((x) => x.label)).toEqual(Array.from(fmnistLabels(OFFSET, COUNT)))
    const logits = new Float32Array(new Uint8Array(readFileSync(dump)).buffer)
    expect(maxAbsDiff(logits, localLogits)).toBeLessThanOrEqual(1e-5)
  }, 90_000)

  it('8-bit + deflate at the bottleneck, 8 images per request: the same classes as the local run', async () => {
    const r = await runCli(['split', 'run', ...INPUT_FLAGS, '--server', address, '--cut', 'bottleneck', '--codec', 'q8+deflate', '--batch', '8', '--labels', TEST_A_LABELS])
    expect(r.code).toBe(0)
    expect(classes(r.stdout).map((x) => x.cls)).toEqual(Array.from(local))
    const sent = Number(/([\d.]+) bytes\/item sent/.exec(r.stderr)![1])
    expect(sent).toBeLessThanOrEqual(196)
  }, 90_000)

  it('--cut auto plans against the server over an emulated 1 Mbit/s, 20 ms link and classifies the same', async () => {
    const r = await runCli([
      'split', 'run', ...INPUT_FLAGS, '--server', address, '--cut', 'auto', '--link', '1mbit:20ms', '--device-memory', '512KB',
      '--codecs', 'f32,q8', '--max-candidates', '2', '--calibration', '16', '--repeats', '3',
    ], { timeoutMs: 180_000 })
    expect(r.code, r.stderr).toBe(0)
    expect(r.stderr).toMatch(/link [\d.]+ Mbit\/s, rtt [\d.]+ ms; plan: #\d+ /)
    expect(r.stderr).not.toMatch(/plan: #35 local/) // the whole model does not fit 512 KB
    const agree = classes(r.stdout).filter((x, i) => x.cls === local[i]).length
    expect(agree).toBeGreaterThanOrEqual(COUNT - 1)
  }, 200_000)

  it('--cut local needs no server and equals the local run', async () => {
    const r = await runCli(['split', 'run', ...INPUT_FLAGS, '--cut', 'local'])
    expect(r.code).toBe(0)
    expect(classes(r.stdout).map((x) => x.cls)).toEqual(Array.from(local))
  }, 60_000)

  it('split plan prints the Pareto table and a choice that fits the device', async () => {
    const r = await runCli([
      'split', 'plan', ...INPUT_FLAGS, '--link', '1mbit:20ms', '--device-memory', '512KB', '--codecs', 'f32,q8,q8+deflate',
      '--max-candidates', '3', '--calibration', '16', '--repeats', '3', '--json',
    ], { timeoutMs: 120_000 })
    expect(r.code, r.stderr).toBe(0)
    const plan = JSON.parse(r.stdout.toString('utf8')) as { choice: { kind: string; deviceBytes: number; feasible: boolean }; rows: { pareto: boolean; kind: string }[] }
    expect(plan.choice.feasible).toBe(true)
    expect(plan.choice.deviceBytes).toBeLessThanOrEqual(512 * 1024)
    expect(plan.rows.some((x) => x.pareto)).toBe(true)
    expect(plan.rows.map((x) => x.kind)).toContain('local')
    const table = await runCli(['split', 'plan', ...INPUT_FLAGS, '--link', '1gbit:1ms', '--codecs', 'f32', '--max-candidates', '1', '--calibration', '8', '--repeats', '3'], { timeoutMs: 120_000 })
    expect(table.code, table.stderr).toBe(0)
    expect(table.stdout.toString('utf8')).toMatch(/^\s+#\s+cut\s+codec\s+bytes\s+device ms\s+link ms\s+server ms\s+total ms\s+agree/m)
    expect(table.stdout.toString('utf8')).toMatch(/^choice: #\d+ /m)
  }, 240_000)

  it('names a bad cut, a bad codec and a missing server in one line with exit code 2', async () => {
    const cut = await runCli(['split', 'run', ...INPUT_FLAGS, '--server', address, '--cut', 'no_such_tensor'])
    expect(cut.code).toBe(2)
    expect(cut.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^edgeshard: cannot cut at tensor no_such_tensor: the model's graph has no tensor of that name$/)])
    const codec = await runCli(['split', 'run', ...INPUT_FLAGS, '--server', address, '--cut', 'bottleneck', '--codec', 'q9'])
    expect(codec.code).toBe(2)
    expect(codec.stderr).toMatch(/invalid codec 'q9'/)
    const noServer = await runCli(['split', 'run', ...INPUT_FLAGS, '--cut', 'bottleneck'])
    expect(noServer.code).toBe(2)
    expect(noServer.stderr.trim()).toBe('edgeshard: give --server ADDR (a running `edgeshard split serve`), or --cut local')
  }, 90_000)
})
