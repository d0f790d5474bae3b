import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { type Browser, chromium } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { tokenBreakdown } from '../../agent/cli/report.ts'
import { type ChromeTrace, clockOffsetMs, mergeTraces, type TraceEvent } from '../../agent/trace.ts'
import { HAVE_MODELS, MODELS_DIR, runCli } from '../support/cli.ts'

const CHROMIUM = '/usr/bin/chromium'
const HAVE_CHROMIUM = existsSync(CHROMIUM)
if (!HAVE_CHROMIUM) process.stderr.write(`skipping the trace report rendering: ${CHROMIUM} is absent (apt-get install chromium)\n`)

describe('trace merging', () => {
  it('estimates the clock offset as NTP does and ignores one inside its error bound', () => {
    // remote clock 100 ms ahead, 2 ms each way, 1 ms processing
    expect(clockOffsetMs(1000, 1102, 1103, 1005)).toBe(100)
    // 0.4 ms estimate with a 4 ms round trip: indistinguishable from 0
    expect(clockOffsetMs(1000, 1002.4, 1002.4, 1004)).toBe(0)
  })

  it('puts every peer on the master clock: origin difference minus offset, µs', () => {
    const trace = mergeTraces([
      { peer: 'A', role: 'master', offsetMs: 0, trace: { timeOriginMs: 1000, spans: [{ name: 'forward', cat: 'forward', startMs: 5, endMs: 7 }] } },
      { peer: 'B', role: 'worker 1', offsetMs: 50, trace: { timeOriginMs: 1040, spans: [{ name: 'ffn', cat: 'compute', startMs: 20, endMs: 21, args: { layer: 0 } }] } },
    ])
    const spans = trace.traceEvents.filter((e) => e.ph === 'X')
    expect(spans).toEqual([
      { name: 'forward', cat: 'forward', ph: 'X', ts: 5000, dur: 2000, pid: 1, tid: 0 },
      { name: 'ffn', cat: 'compute', ph: 'X', ts: 10_000, dur: 1000, pid: 2, tid: 0, args: { layer: 0 } },
    ])
    const names = trace.traceEvents.filter((e) => e.name === 'process_name').map((e) => [e.pid, e.args?.name])
    expect(names).toEqual([
      [1, 'master A'],
      [2, 'worker 1 B'],
    ])
  })

  it('splits a token into compute, allreduce wait, I/O wait and the rest', () => {
    const span = (cat: string, ts: number, dur: number, args?: Record<string, unknown>): TraceEvent => ({ name: cat, cat, ph: 'X', ts, dur, pid: 1, tid: 0, ...(args ? { args } : {}) })
    const parts = tokenBreakdown([span('token', 0, 10_000, { index: 0 }), span('compute', 1000, 3000), span('allreduce', 4000, 4000), span('io', 9000, 2000)])
    expect(parts).toEqual([{ index: 0, computeMs: 3, allreduceMs: 4, ioMs: 1, otherMs: 2 }])
  })
})

describe.skipIf(!HAVE_MODELS)('edgeshard run --trace and edgeshard report', () => {
  const dir = mkdtempSync(join(tmpdir(), 'edgeshard-trace-'))
  const traceFile = join(dir, 'trace.json')
  const summaryFile = join(dir, 'summary.json')
  const svgFile = join(dir, 'trace.svg')
  let trace: ChromeTrace
  let generated: number
  let browser: Browser | undefined

  beforeAll(async () => {
    const run = await runCli(
      ['run', '--model', `${MODELS_DIR}stories260K.bin`, '--peers', '3', '--max-tokens', '8', '--temperature', '0', '--trace', traceFile, '--summary-json', summaryFile],
      { timeoutMs: 90_000 },
    )
    expect(run.code, run.stderr).toBe(0)
    trace = JSON.parse(readFileSync(traceFile, 'utf8')) as ChromeTrace
    generated = (JSON.parse(readFileSync(summaryFile, 'utf8')) as { generated: number }).generated
    if (HAVE_CHROMIUM) {
      browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] })
    }
  }, 120_000)
  afterAll(async () => {
    await browser?.close()
    rmSync(dir, { recursive: true, force: true })
  })

  const spansOf = (pid: number): TraceEvent[] => trace.traceEvents.filter((e) => e.ph === 'X' && e.pid === pid)

  it('names one process per peer, the master first, and every peer has spans', () => {
    const names = trace.traceEvents.filter((e) => e.ph === 'M' && e.name === 'process_name')
    expect(names.map((e) => e.pid)).toEqual([1, 2, 3])
    expect(names.map((e) => String(e.args?.name).split(' 12D3Koo')[0])).toEqual(['master', 'worker 1', 'worker 2'])
    for (const pid of [1, 2, 3]) expect(spansOf(pid).length).toBeGreaterThan(0)
    for (const e of trace.traceEvents.filter((e) => e.ph === 'X')) {
      expect(Number.isFinite(e.ts) && Number.isFinite(e.dur) && e.dur! >= 0).toBe(true)
    }
  })

  it('has one token span per generated token on the master, indices 0..n-1', () => {
    expect(generated).toBeGreaterThan(1)
    const tokens = spansOf(1).filter((e) => e.cat === 'token')
    expect(tokens.map((e) => e.args?.index)).toEqual(Array.from({ length: generated }, (_, i) => i))
    expect(trace.traceEvents.filter((e) => e.cat === 'token' && e.pid !== 1)).toEqual([])
  })

  it('has compute and allreduce spans for every layer of every forward pass on every peer', () => {
    const nLayers = 5 // stories260K
    const steps = Array.from({ length: generated }, (_, i) => i) // the prefill, then one per token after the first
    for (const pid of [1, 2, 3]) {
      const spans = spansOf(pid)
      expect(spans.filter((e) => e.cat === 'forward').map((e) => e.args?.step)).toEqual(steps)
      const keys = new Set(spans.filter((e) => e.cat === 'compute' || e.cat === 'allreduce').map((e) => `${e.name}/${String(e.args?.block)}/${e.args?.step}/${e.args?.layer}`))
      for (const step of steps) {
        for (let layer = 0; layer < nLayers; layer++) {
          for (const key of ['attention/undefined', 'ffn/undefined', 'allreduce/attention', 'allreduce/ffn']) {
            expect(keys.has(`${key}/${step}/${layer}`), `pid ${pid} ${key} step ${step} layer ${layer}`).toBe(true)
          }
        }
      }
      // Network: allreduce frames both ways on every peer.
      const net = spans.filter((e) => e.cat === 'net').map((e) => e.name)
      expect(net).toContain('send ar')
      expect(net).toContain('recv ar')
    }
    // The master sends each forward's hidden state to both workers.
    expect(spansOf(1).filter((e) => e.name === 'send forward')).toHaveLength(2 * generated)
  })

  it('aligns the workers with the master: each worker forward overlaps the master forward of the same step', () => {
    const forwards = (pid: number): TraceEvent[] => spansOf(pid).filter((e) => e.cat === 'forward')
    const master = forwards(1)
    for (const pid of [2, 3]) {
      for (const [step, w] of forwards(pid).entries()) {
        const m = master[step]!
        expect(w.ts, `pid ${pid} step ${step}`).toBeLessThan(m.ts + m.dur!)
        expect(w.ts + w.dur!, `pid ${pid} step ${step}`).toBeGreaterThan(m.ts)
      }
    }
  })

  it.skipIf(!HAVE_CHROMIUM)('edgeshard report draws an SVG with one lane per peer that renders in Chromium', async () => {
    const report = await runCli(['report', traceFile, '--svg', svgFile])
    expect(report.code, report.stderr).toBe(0)
    const page = await browser!.newPage()
    const errors: string[] = []
    page.on('pageerror', (e) => errors.push(e.message))
    await page.goto(pathToFileURL(svgFile).href)
    expect(await page.locator(':root').evaluate((e) => e.tagName)).toBe('svg')
    const lanes = page.locator('[data-lane]')
    expect(await lanes.count()).toBe(3)
    expect(await lanes.evaluateAll((els) => els.map((e) => e.getAttribute('data-role')))).toEqual(['master', 'worker 1', 'worker 2'])
    for (let i = 0; i < 3; i++) {
      const box = await lanes.nth(i).boundingBox()
      expect(box!.width).toBeGreaterThan(500)
      expect(box!.height).toBeGreaterThan(20)
      expect(await lanes.nth(i).locator('[data-span="compute"]').count()).toBeGreaterThan(0)
      expect(await lanes.nth(i).locator('[data-span="allreduce"]').count()).toBeGreaterThan(0)
    }
    expect(await page.locator('[data-token-bar]').count()).toBe(generated)
    expect(await page.locator('[data-legend]').count()).toBeGreaterThanOrEqual(4)
    expect(errors).toEqual([])
    await page.close()
  }, 60_000)
})
