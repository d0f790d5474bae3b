import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { type MeasuredProfile, profileCacheKey, readCachedProfile, writeCachedProfile } from '../../../agent/device-measure.ts'
import { runCli } from '../../support/cli.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-profile-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('edgeshard profile', () => {
  it('measures with the real kernels, caches per host, and shows the cached measurement', async () => {
    const cache = join(dir, 'profile.json')
    const first = await runCli(['profile', '--json', '--cache', cache, '--disk-dir', dir, '--disk-bytes', '8MiB'], { timeoutMs: 120_000 })
    expect(first.stderr).toBe('')
    expect(first.code).toBe(0)
    const measured = JSON.parse(first.stdout.toString('utf8')) as MeasuredProfile & { cached: boolean; cachePath: string }
    expect(measured).toMatchObject({ version: 2, key: profileCacheKey(), cached: false, cachePath: cache })
    const c = measured.capabilities
    for (const value of [c.memoryBytes, c.cores, c.decodeGBs, c.decodeNBitsGBs!, c.prefillGflops, c.diskReadMBs]) {
      expect(Number.isFinite(value) && value > 0).toBe(true)
    }
    // Rates are the figures behind them: bytes / median time.
    const d = measured.details
    expect(c.decodeGBs).toBeCloseTo(d.decodeF32.weightBytes / (d.decodeF32.medianMs * 1e6), 9)
    expect(c.prefillGflops).toBeCloseTo((2 * 64 * 2048 * 2048) / (d.prefill.medianMs * 1e6), 9)
    expect(d.disk).toMatchObject({ bytes: 8 * 2 ** 20, directory: dir })
    expect(readdirSync(dir).filter((f) => f.startsWith('edgeshard-disk-probe-'))).toEqual([])
    expect(readCachedProfile(cache)?.measuredAt).toBe(measured.measuredAt)

    const second = await runCli(['profile', '--cache', cache])
    expect(second.code).toBe(0)
    const text = second.stdout.toString('utf8')
    expect(text).toContain(`measured ${measured.measuredAt} (cached; --refresh measures again)`)
    expect(text).toMatch(/\n {2}decode f32 +[\d.]+ GB\/s +Gemm \[1, 4096\] × \d+ MiB weight, median [\d.]+ ms of \d+\n/)
    expect(text).toContain(`  cache: ${cache}\n`)
  })

  it('keeps other hosts in the cache file and ignores malformed entries', () => {
    const cache = join(dir, 'shared.json')
    const other = { version: 2, key: 'other|8|unlimited', measuredAt: 'x', capabilities: {}, details: {} }
    writeFileSync(cache, JSON.stringify({ version: 2, profiles: { [other.key]: other } }))
    expect(readCachedProfile(cache)).toBeUndefined()
    const mine = {
      version: 2,
      key: profileCacheKey(),
      measuredAt: '2026-01-01T00:00:00.000Z',
      capabilities: { memoryBytes: 1e9, cores: 2, decodeGBs: 10, prefillGflops: 50, diskReadMBs: 500 },
      details: {},
    } as unknown as MeasuredProfile
    writeCachedProfile(cache, mine)
    const doc = JSON.parse(readFileSync(cache, 'utf8')) as { profiles: Record<string, unknown> }
    expect(Object.keys(doc.profiles).sort()).toEqual([profileCacheKey(), other.key].sort())
    expect(readCachedProfile(cache)?.capabilities).toEqual(mine.capabilities)
    writeCachedProfile(cache, { ...mine, capabilities: { ...mine.capabilities, decodeGBs: -1 } })
    expect(readCachedProfile(cache)).toBeUndefined()
    expect(existsSync(`${cache}.${process.pid}.tmp`)).toBe(false)
  })
})

