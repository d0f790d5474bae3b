/**
 * `edgeshard profile [--json] [--refresh]`: measures this device with the real kernels (agent/device-measure.ts) or
 * shows its cached measurement, and the agent-side helper that publishes it in the info protocol.
 */
import { closeSync, mkdirSync, openSync, statSync, unlinkSync } from 'node:fs'
import { dirname } from 'node:path'
import { type Command, Option } from 'commander'
import { defaultProfileCachePath, loadOrMeasureProfile, type MeasuredProfile, readCachedProfile } from '../device-measure.ts'
import { publishMeasuredCapabilities } from '../peer-info.ts'
import { byteSize } from './arguments.ts'

interface ProfileFlags {
  json?: boolean
  refresh?: boolean
  cache?: string
  diskDir?: string
  diskBytes?: number
}

async function profile(flags: ProfileFlags): Promise<void> {
  const cachePath = flags.cache ?? defaultProfileCachePath()
  if (!flags.json && (flags.refresh || !readCachedProfile(cachePath))) process.stderr.write('edgeshard: measuring this device (a few seconds)…\n')
  const { profile: measured, cached } = await loadOrMeasureProfile({
    cachePath,
    ...(flags.refresh ? { refresh: true } : {}),
    ...(flags.diskDir ? { diskDirectory: flags.diskDir } : {}),
    ...(flags.diskBytes ? { diskBytes: flags.diskBytes } : {}),
  })
  if (flags.json) {
    process.stdout.write(`${JSON.stringify({ ...measured, cached, cachePath }, null, 2)}\n`)
    return
  }
  process.stdout.write(formatProfile(measured, cached, cachePath))
}

/** The profile as aligned lines for a terminal. */
export function formatProfile(p: MeasuredProfile, cached: boolean, cachePath: string): string {
  const c = p.capabilities
  const d = p.details
  const mib = (b: number): string => `${(b / 2 ** 20).toFixed(0)} MiB`
  const gib = (b: number): string => `${(b / 2 ** 30).toFixed(1)} GiB`
  const ms = (x: number): string => `${x.toFixed(2)} ms`
  const quota = d.cpuQuotaCores === null ? '' : ` (cgroup quota ${d.cpuQuotaCores} of ${d.logicalCores} cores)`
  const rows: [string, string, string][] = [
    ['memory available', gib(c.memoryBytes), d.cgroupMemoryLimitBytes === null ? 'os.freemem' : `cgroup limit ${gib(d.cgroupMemoryLimitBytes)}`],
    ['cores', String(Number(c.cores.toFixed(3))), `${d.threads} onnxruntime threads${quota}`],
    ['decode f32', `${c.decodeGBs.toFixed(1)} GB/s`, `Gemm [1, 4096] × ${mib(d.decodeF32.weightBytes)} weight, median ${ms(d.decodeF32.medianMs)} of ${d.decodeF32.runs}`],
    [
      'decode 4-bit',
      `${(c.decodeNBitsGBs ?? c.decodeGBs).toFixed(1)} GB/s`,
      `MatMulNBits [1, 4096] × ${mib(d.decodeNBits.weightBytes)} blob + scales, median ${ms(d.decodeNBits.medianMs)} of ${d.decodeNBits.runs}`,
    ],
    ['prefill', `${c.prefillGflops.toFixed(0)} GFLOP/s`, `[64, 2048] × [2048, 2048] f32, median ${ms(d.prefill.medianMs)} of ${d.prefill.runs}`],
    [
      'disk read',
      `${c.diskReadMBs.toFixed(0)} MB/s`,
      `${mib(d.disk.bytes)} in ${d.disk.directory}, ${d.disk.direct ? 'O_DIRECT' : 'buffered (page cache likely: O_DIRECT refused)'}`,
    ],
  ]
  const w0 = Math.max(...rows.map((r) => r[0].length))
  const w1 = Math.max(...rows.map((r) => r[1].length))
  const head =
    `${d.hostname}: measured ${p.measuredAt}${cached ? ' (cached; --refresh measures again)' : ''}, load average ${d.loadAverage.toFixed(2)}, ` +
    `${(d.durationMs / 1000).toFixed(1)} s\n`
  return `${head}${rows.map((r) => `  ${r[0].padEnd(w0)}  ${r[1].padEnd(w1)}  ${r[2]}\n`).join('')}  cache: ${cachePath}\n`
}

/** A lock older than this is a crashed measurement's and is taken over, ms. */
const STALE_LOCK_MS = 120_000

/**
 * For `edgeshard agent`: publishes this device's cached measurement in the info protocol, or (when `measure` and no
 * other process on this host is measuring, see the lock file beside the cache) measures first. Local workers of
 * `run --peers` pass `measure: false`: they only publish a cached measurement.
 * @throws what the measurement throws (the agent keeps serving without a measurement)
 */
export async function publishDeviceProfile(options: { readonly measure: boolean; readonly cachePath?: string }): Promise<void> {
  const cachePath = options.cachePath ?? defaultProfileCachePath()
  const cached = readCachedProfile(cachePath)
  if (cached) {
    publishMeasuredCapabilities(cached.capabilities)
    return
  }
  if (!options.measure) return
  const lock = `${cachePath}.lock`
  try {
    if (Date.now() - statSync(lock).mtimeMs < STALE_LOCK_MS) return // another agent on this host is measuring
    unlinkSync(lock)
  } catch {}
  let fd: number
  try {
    mkdirSync(dirname(cachePath), { recursive: true })
    fd = openSync(lock, 'wx')
  } catch {
    return // another agent just took the lock (or the cache folder cannot be created)
  }
  try {
    await measureAndPublish({ cachePath })
  } finally {
    closeSync(fd)
    try {
      unlinkSync(lock)
    } catch {}
  }
}

/** The measurement in progress in this process (the start's and a survey's share it). */
let measuring: Promise<{ cached: boolean }> | null = null

/**
 * For an agent asked by a master's survey (agent/link-survey.ts), and at its start: loads this device's cached
 * measurement for its present CPU quota (the cache key includes it, so an emulated device placed in its cgroup after
 * starting gets its own) or measures it now, and publishes it in the info protocol. Calls made while a measurement
 * runs wait for it.
 * @throws what the measurement throws
 */
export function measureAndPublish(options: { readonly cachePath?: string } = {}): Promise<{ cached: boolean }> {
  measuring ??= loadOrMeasureProfile({ cachePath: options.cachePath ?? defaultProfileCachePath() })
    .then(({ profile, cached }) => {
      publishMeasuredCapabilities(profile.capabilities)
      return { cached }
    })
    .finally(() => {
      measuring = null
    })
  return measuring
}

/** Registers `edgeshard profile` on `program`. */
export function registerProfile(program: Command): void {
  program
    .command('profile')
    .description('measure this device with the real kernels (decode GB/s, prefill GFLOP/s, disk MB/s, memory) or show the cached measurement')
    .option('--json', 'print the profile as JSON (capabilities, raw figures, cache path)')
    .option('--refresh', 'measure again even when a cached measurement exists')
    .option('--cache <file>', 'cache file (default: $EDGESHARD_PROFILE_CACHE or ~/.cache/edgeshard/profile.json)')
    .option('--disk-dir <dir>', 'directory of the disk probe, where shard files would go (default: the OS temp dir)')
    .addOption(new Option('--disk-bytes <bytes>', 'size of the disk probe file (default 64MiB)').argParser(byteSize))
    .action(profile)
}
