/**
 * The split planner on a recorded profile of the BottleFit student (bottlefit-profile.json: real head/tail/codec
 * timings, payload bytes and agreement measured on this project's machine), so its choices are deterministic.
 */
import { readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { type DeviceProfile, linkMoved, planSplit, Replanner, type SplitOption, transferMs } from '../../../splitter/index.ts'

const FIXTURE = JSON.parse(readFileSync(new URL('./bottlefit-profile.json', import.meta.url), 'utf8')) as { options: SplitOption[] }
const options = FIXTURE.options

const SLOW_LINK = { rttMs: 20, bitsPerSecond: 1e6 }
const FAST_LINK = { rttMs: 1, bitsPerSecond: 1e9 }
/** A phone-class device: twice as slow as the profiling machine, 512 KB for model weights (the whole model is 1.47 MB). */
const SMALL_DEVICE: DeviceProfile = { name: 'small device', slowdown: 2, memoryBytes: 512 * 1024 }
/** A microcontroller-class device: 50 times slower. */
const SLOW_DEVICE: DeviceProfile = { name: 'slow device', slowdown: 50 }
const FAST_DEVICE: DeviceProfile = { name: 'fast device', slowdown: 1 }

describe('planSplit on the BottleFit profile', () => {
  it('1 Mbit/s, 20 ms: picks the 8-bit bottleneck cut over offload (the whole model does not fit the device)', () => {
    const plan = planSplit({ options, link: SLOW_LINK, device: SMALL_DEVICE })
    expect(plan.choice).toMatchObject({ kind: 'cut', label: 'bottleneck', codec: 'q8', bytes: 220 })
    const offload = plan.rows.find((r) => r.kind === 'offload' && r.feasible)!
    expect(offload.codec).toBe('q8+deflate') // the best way to send the input: 359 bytes
    expect(plan.choice.totalMs).toBeLessThan(offload.totalMs)
    expect(plan.rows.find((r) => r.kind === 'local')!.feasible).toBe(false)
    // q4 sends fewer bytes but misses the 0.99 agreement bound
    expect(plan.rows.find((r) => r.label === 'bottleneck' && r.codec === 'q4+deflate')!.feasible).toBe(false)
  })

  it('1 Gbit/s, 1 ms and a slow device: picks full offload', () => {
    const plan = planSplit({ options, link: FAST_LINK, device: SLOW_DEVICE })
    expect(plan.choice.kind).toBe('offload')
    expect(plan.choice.totalMs).toBeLessThan(plan.rows.find((r) => r.kind === 'local')!.totalMs)
    expect(plan.choice.totalMs).toBeLessThan(plan.rows.find((r) => r.label === 'bottleneck')!.totalMs)
  })

  it('a fast device picks local-only', () => {
    for (const link of [FAST_LINK, SLOW_LINK]) {
      const plan = planSplit({ options, link, device: FAST_DEVICE })
      expect(plan.choice).toMatchObject({ kind: 'local', codec: '-', transferMs: 0, bytes: 0 })
    }
  })

  it('predicts total = head + encode on the device, transfer, decode + tail on the server', () => {
    const plan = planSplit({ options, link: SLOW_LINK, device: SMALL_DEVICE, server: { name: 'server', slowdown: 1.5 } })
    const o = options.find((x) => x.label === 'bottleneck' && x.codec === 'q8')!
    const row = plan.rows.find((r) => r.label === 'bottleneck' && r.codec === 'q8')!
    expect(row.deviceMs).toBeCloseTo((o.headMs + o.encodeMs) * 2, 9)
    expect(row.transferMs).toBeCloseTo(20 + ((220 + o.replyBytes) * 8) / 1000, 9)
    expect(row.serverMs).toBeCloseTo((o.decodeMs + o.tailMs) * 1.5, 9)
    expect(row.totalMs).toBeCloseTo(row.deviceMs + row.transferMs + row.serverMs, 9)
    expect(transferMs(1000, SLOW_LINK)).toBe(28)
  })

  it('marks the Pareto front over (total time, bytes, agreement) among options that fit the device', () => {
    const plan = planSplit({ options, link: SLOW_LINK, device: SMALL_DEVICE })
    const front = plan.rows.filter((r) => r.pareto)
    const fitting = plan.rows.filter((r) => r.deviceBytes <= SMALL_DEVICE.memoryBytes!)
    expect(front).toContain(plan.choice)
    for (const a of front) {
      for (const b of fitting) {
        const dominates = b.totalMs <= a.totalMs && b.bytes <= a.bytes && b.agreement >= a.agreement && (b.totalMs < a.totalMs || b.bytes < a.bytes || b.agreement > a.agreement)
        expect(dominates, `${b.label}/${b.codec} dominates ${a.label}/${a.codec}`).toBe(false)
      }
    }
    // the 4-bit bottleneck trades agreement for bytes: on the front, but below the bound
    expect(front.find((r) => r.label === 'bottleneck' && r.codec === 'q4+deflate')).toMatchObject({ feasible: false, bytes: 127 })
    expect(plan.rows.filter((r) => r.deviceBytes > SMALL_DEVICE.memoryBytes!).every((r) => !r.pareto && !r.feasible)).toBe(true)
    expect(plan.rows.map((r) => r.totalMs)).toEqual([...plan.rows.map((r) => r.totalMs)].sort((a, b) => a - b))
  })

  it('on the slow link without a memory bound, local-only wins: 20 ms of round trip buy a lot of device time', () => {
    expect(planSplit({ options, link: SLOW_LINK, device: { name: 'phone', slowdown: 20 } }).choice.kind).toBe('local')
  })

  it('refuses an impossible plan with PlanError and bad arguments with RangeError', () => {
    expect(() => planSplit({ options, link: SLOW_LINK, minAgreement: 1.01 })).toThrow(RangeError)
    expect(() => planSplit({ options: [], link: SLOW_LINK })).toThrow(expect.objectContaining({ name: 'PlanError' }))
    const lossy = options.filter((o) => o.agreement < 0.99)
    expect(() => planSplit({ options: lossy, link: SLOW_LINK })).toThrow(expect.objectContaining({ name: 'PlanError', message: expect.stringMatching(/no option reaches top-1 agreement 0.99 \(best 0\.9805\)/) }))
    expect(() => planSplit({ options, link: SLOW_LINK, device: { name: 'tiny', slowdown: 1, memoryBytes: 100 } })).toThrow(/smallest head needs 126/)
    expect(() => planSplit({ options, link: { rttMs: 1, bitsPerSecond: 0 } })).toThrow(/invalid link/)
    expect(() => planSplit({ options, link: SLOW_LINK, device: { name: 'd', slowdown: 0 } })).toThrow(/invalid device d/)
  })
})

describe('re-planning when the link moves', () => {
  it('linkMoved compares rate and round trip against a fraction', () => {
    expect(linkMoved(SLOW_LINK, { rttMs: 21, bitsPerSecond: 1.2e6 }, 0.5)).toBe(false)
    expect(linkMoved(SLOW_LINK, { rttMs: 20, bitsPerSecond: 0.4e6 }, 0.5)).toBe(true)
    expect(linkMoved(SLOW_LINK, { rttMs: 40, bitsPerSecond: 1e6 }, 0.5)).toBe(true)
    expect(() => linkMoved(SLOW_LINK, SLOW_LINK, 0)).toThrow(RangeError)
  })

  it('Replanner keeps the plan for small moves and re-plans past the fraction', () => {
    const device: DeviceProfile = { name: 'mid device', slowdown: 50 }
    const r = new Replanner({ options, link: FAST_LINK, device }, 0.5)
    expect(r.plan.choice.kind).toBe('offload')
    expect(r.observe({ rttMs: 1.2, bitsPerSecond: 0.8e9 })).toBeUndefined()
    const next = r.observe({ rttMs: 1, bitsPerSecond: 2e5 }) // the link collapses to 200 kbit/s
    expect(next).toBeDefined()
    expect(next!.choice.label).toBe('bottleneck')
    expect(r.plan).toBe(next)
    // back to fast: offload again
    expect(r.observe(FAST_LINK)!.choice.kind).toBe('offload')
  })
})
