/**
 * Measures this device with the kernels edgeshard really runs (onnxruntime through agent/runtime.ts): decode-size
 * matrix-vector products (dense f32 Gemm and 4-bit MatMulNBits, weights as pre-packed initializers, as a resident
 * shard runs them), a prefill-size matrix product, sequential disk reads, and the memory and cores this process may
 * use (cgroup limits included). The result is cached per host (hostname, logical cores, CPU quota) in a JSON file,
 * so agents publish it at start without measuring again.
 *
 * Timings are medians; the whole measurement takes a few seconds (most of it writing and reading the disk probe).
 */
import { randomBytes } from 'node:crypto'
import { constants as fsConstants, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { open, unlink } from 'node:fs/promises'
import { availableParallelism, freemem, homedir, hostname, loadavg, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { logger } from '@libp2p/logger'
import { type DeviceCapabilities, parseCapabilities } from '../devices/index.ts'
import { GraphBuilder } from '../splitter/index.ts'
import { type HostTensor, Session } from './runtime.ts'

const log = logger('edgeshard:agent:measure')

/** A measurement of this device: the capabilities a planner uses, plus how they were obtained. */
export interface MeasuredProfile {
  readonly version: 2
  /** Cache key: `hostname|logical cores|cpu quota` (see {@link profileCacheKey}). */
  readonly key: string
  /** When it was measured (ISO 8601). */
  readonly measuredAt: string
  readonly capabilities: DeviceCapabilities
  readonly details: MeasureDetails
}

/** The raw figures behind a {@link MeasuredProfile}. */
export interface MeasureDetails {
  readonly hostname: string
  /** Logical cores the OS reports (`os.availableParallelism`). */
  readonly logicalCores: number
  /** cgroup CPU quota in cores (quota / period), or null when unlimited. */
  readonly cpuQuotaCores: number | null
  /** onnxruntime intra-op threads used for the kernels. */
  readonly threads: number
  /** Dense f32 Gemm [1, K] × [K, N]ᵀ: weight bytes and median ms. */
  readonly decodeF32: { readonly weightBytes: number; readonly medianMs: number; readonly runs: number }
  /** MatMulNBits 4-bit [1, K] × [N, K]: blob + scales bytes and median ms. */
  readonly decodeNBits: { readonly weightBytes: number; readonly medianMs: number; readonly runs: number }
  /** [64, 2048] × [2048, 2048] f32: FLOPs (2·m·k·n) and median ms. */
  readonly prefill: { readonly flops: number; readonly medianMs: number; readonly runs: number }
  /** Sequential read of a file written for the purpose: bytes, ms, directory, and whether O_DIRECT bypassed the page cache. */
  readonly disk: { readonly bytes: number; readonly ms: number; readonly directory: string; readonly direct: boolean }
  /** `os.freemem()` (MemAvailable on Linux) at measurement time, bytes. */
  readonly freeMemoryBytes: number
  /** cgroup memory limit, bytes, or null when unlimited. */
  readonly cgroupMemoryLimitBytes: number | null
  /** 1-minute load average when measured (shared machines are noisy). */
  readonly loadAverage: number
  /** Wall time of the whole measurement, ms. */
  readonly durationMs: number
}

/** Options of {@link measureDevice}. */
export interface MeasureOptions {
  /** Bytes of the disk probe file. Default 64 MiB. */
  readonly diskBytes?: number
  /** Directory of the disk probe (where shard files would go). Default: the OS temp dir. */
  readonly diskDirectory?: string
  /** Upper bound on the f32 decode weight, bytes (the NBits one is ~60 % of it). Default 64 MiB, less on small memory. */
  readonly decodeWeightBytes?: number
  readonly signal?: AbortSignal
}

const MiB = 2 ** 20

/** The CPU quota of this process's cgroup in cores (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or null. */
export function cgroupCpuQuotaCores(): number | null {
  const v2 = readCgroupFile('', 'cpu.max')
  if (v2 !== undefined) {
    const [quota, period] = v2.trim().split(/\s+/)
    return quota === 'max' || quota === undefined ? null : Number(quota) / Number(period ?? 100000)
  }
  const quota = Number(readCgroupFile('cpu', 'cpu.cfs_quota_us') ?? -1)
  const period = Number(readCgroupFile('cpu', 'cpu.cfs_period_us') ?? 100000)
  return quota > 0 && period > 0 ? quota / period : null
}

/** The memory limit of this process's cgroup and its current usage, bytes (v2 `memory.max`, v1 `memory.limit_in_bytes`), or null. */
export function cgroupMemory(): { limitBytes: number; usageBytes: number } | null {
  const v2 = readCgroupFile('', 'memory.max')
  if (v2 !== undefined) {
    if (v2.trim() === 'max') return null
    return { limitBytes: Number(v2), usageBytes: Number(readCgroupFile('', 'memory.current') ?? 0) }
  }
  const limit = Number(readCgroupFile('memory', 'memory.limit_in_bytes') ?? Number.NaN)
  // An unlimited v1 cgroup reports ~2^63 rounded down to a page.
  if (!Number.isFinite(limit) || limit >= 2 ** 60) return null
  return { limitBytes: limit, usageBytes: Number(readCgroupFile('memory', 'memory.usage_in_bytes') ?? 0) }
}

/** Reads `file` of this process's cgroup for `controller` ('' = the v2 unified hierarchy); undefined when absent. */
function readCgroupFile(controller: string, file: string): string | undefined {
  let lines: string[]
  try {
    lines = readFileSync('/proc/self/cgroup', 'utf8').trim().split('\n')
  } catch {
    return undefined
  }
  const line = lines.find((l) => {
    const [, controllers] = l.split(':')
    return controller === '' ? l.startsWith('0::') : (controllers ?? '').split(',').includes(controller)
  })
  if (line === undefined) return undefined
  const path = line.slice(line.indexOf(':', line.indexOf(':') + 1) + 1)
  const roots =
    controller === ''
      ? ['/sys/fs/cgroup']
      : [`/sys/fs/cgroup/${controller}`, `/sys/fs/cgroup/${line.split(':')[1]}`]
  for (const root of roots) {
    // In a container the cgroup namespace makes our cgroup the mount's root: try the path, then the root.
    for (const candidate of [join(root, path, file), join(root, file)]) {
      try {
        return readFileSync(candidate, 'utf8')
      } catch {}
    }
  }
  return undefined
}

/** Logical cores, cgroup quota and the cores this process may use (quota-limited, may be fractional). */
export function hostCores(): { logical: number; quotaCores: number | null; effective: number } {
  const logical = availableParallelism()
  const quotaCores = cgroupCpuQuotaCores()
  return { logical, quotaCores, effective: quotaCores === null ? logical : Math.min(logical, quotaCores) }
}

/** Memory this process may use now, bytes: `os.freemem()`, lowered to what the cgroup limit leaves. */
export function availableMemoryBytes(): { availableBytes: number; freeBytes: number; cgroupLimitBytes: number | null } {
  const freeBytes = freemem()
  const cg = cgroupMemory()
  const availableBytes = cg === null ? freeBytes : Math.max(0, Math.min(freeBytes, cg.limitBytes - cg.usageBytes))
  return { availableBytes, freeBytes, cgroupLimitBytes: cg?.limitBytes ?? null }
}

/** Cache key of this host: hostname, logical cores and cgroup CPU quota (emulated agents on one host differ by quota). */
export function profileCacheKey(): string {
  const { logical, quotaCores } = hostCores()
  return `${hostname()}|${logical}|${quotaCores === null ? 'unlimited' : quotaCores.toFixed(3)}`
}

/**
 * Where measured profiles are cached: `$EDGESHARD_PROFILE_CACHE`, else `$XDG_CACHE_HOME/edgeshard/profile.json`, else
 * `~/.cache/edgeshard/profile.json`.
 */
export function defaultProfileCachePath(): string {
  const explicit = process.env.EDGESHARD_PROFILE_CACHE
  if (explicit) return explicit
  const base = process.env.XDG_CACHE_HOME || join(homedir(), '.cache')
  return join(base, 'edgeshard', 'profile.json')
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)]!
}

/** Runs `session` on `feeds` after 2 warm-up runs: at least 5 timed runs, then until ~`budgetMs` or 25 runs. */
async function timeRuns(session: Session, feeds: Record<string, HostTensor>, budgetMs: number, signal?: AbortSignal): Promise<{ medianMs: number; runs: number }> {
  for (let i = 0; i < 2; i++) await session.run(feeds)
  const times: number[] = []
  const startMs = performance.now()
  while (times.length < 5 || (times.length < 25 && performance.now() - startMs < budgetMs)) {
    signal?.throwIfAborted()
    const t0 = performance.now()
    await session.run(feeds)
    times.push(performance.now() - t0)
  }
  return { medianMs: median(times), runs: times.length }
}

function patternF32(n: number): Float32Array {
  const out = new Float32Array(n) // values in ±0.06: no denormals, no zero weights for a kernel to skip
  for (let i = 0; i < n; i++) out[i] = ((i * 2654435761) % 251) / 2000 - 0.0625
  return out
}

function bytesOf(data: Float32Array): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
}

/** Dense decode: Gemm(transB) of x [1, k] with an f32 initializer [n, k], as a resident shard's projection. */
async function measureDecodeF32(k: number, n: number, threads: number, signal?: AbortSignal): Promise<MeasureDetails['decodeF32']> {
  const g = new GraphBuilder('measure_decode_f32')
  const x = g.input('x', 'float32', [1, k])
  const w = g.constant('w', { type: 'float32', dims: [n, k], bytes: bytesOf(patternF32(n * k)) })
  g.output(g.op('Gemm', [x, w], { transB: 1 }), 'y', 'float32', [1, n])
  const session = await Session.create('measure_decode_f32', g.toBytes(), { threads })
  try {
    const t = await timeRuns(session, { x: { data: patternF32(k), dims: [1, k] } }, 600, signal)
    return { weightBytes: n * k * 4, ...t }
  } finally {
    await session.release()
  }
}

/**
 * Quantized decode: MatMulNBits (4 bits, blocks of 32) of x [1, k] with initializers for [n, k], at accuracy level 4
 * (int8 activations: the CLI's default `--quantized-matmul int8`, llama.cpp's arithmetic; 2–3× the level-0 speed).
 */
async function measureDecodeNBits(k: number, n: number, threads: number, signal?: AbortSignal): Promise<MeasureDetails['decodeNBits']> {
  const blocks = (n * k) / 32
  const blob = randomBytes(blocks * 16) // [n, k/32, 16] uint8: 4-bit weights
  const scales = new Float32Array(blocks).fill(0.01) // [n·k/32] f32
  const g = new GraphBuilder('measure_decode_nbits')
  const x = g.input('x', 'float32', [1, k])
  const b = g.constant('w', { type: 'uint8', dims: [n, k / 32, 16], bytes: blob })
  const s = g.constant('w_scales', { type: 'float32', dims: [blocks], bytes: bytesOf(scales) })
  const y = g.node('MatMulNBits', [x, b, s], { attrs: { K: k, N: n, bits: 4, block_size: 32, accuracy_level: 4 }, domain: 'com.microsoft' })[0]!
  g.output(y, 'y', 'float32', [1, n])
  const session = await Session.create('measure_decode_nbits', g.toBytes(), { threads })
  try {
    const t = await timeRuns(session, { x: { data: patternF32(k), dims: [1, k] } }, 600, signal)
    return { weightBytes: blob.byteLength + scales.byteLength, ...t }
  } finally {
    await session.release()
  }
}

/** Prefill: Gemm(transB) of x [m, k] with an f32 initializer [n, k]. */
async function measurePrefill(m: number, k: number, n: number, threads: number, signal?: AbortSignal): Promise<MeasureDetails['prefill']> {
  const g = new GraphBuilder('measure_prefill')
  const x = g.input('x', 'float32', [m, k])
  const w = g.constant('w', { type: 'float32', dims: [n, k], bytes: bytesOf(patternF32(n * k)) })
  g.output(g.op('Gemm', [x, w], { transB: 1 }), 'y', 'float32', [m, n])
  const session = await Session.create('measure_prefill', g.toBytes(), { threads })
  try {
    const t = await timeRuns(session, { x: { data: patternF32(m * k), dims: [m, k] } }, 600, signal)
    return { flops: 2 * m * k * n, ...t }
  } finally {
    await session.release()
  }
}

/**
 * Writes `bytes` of incompressible data to a file in `directory`, then reads it back sequentially, with O_DIRECT where
 * the OS and filesystem allow it (bypassing the page cache that still holds what was just written; `direct` false
 * means the figure is likely the page cache's). The file is removed afterwards.
 */
export async function measureDiskRead(directory: string, bytes: number, signal?: AbortSignal): Promise<MeasureDetails['disk']> {
  const chunkBytes = 4 * MiB
  const total = Math.max(chunkBytes, Math.floor(bytes / chunkBytes) * chunkBytes)
  const path = join(directory, `edgeshard-disk-probe-${process.pid}-${randomBytes(4).toString('hex')}`)
  const data = randomBytes(chunkBytes)
  try {
    const w = await open(path, 'w')
    try {
      for (let done = 0; done < total; done += chunkBytes) {
        signal?.throwIfAborted()
        await w.write(data, 0, chunkBytes, done)
      }
      await w.sync()
    } finally {
      await w.close()
    }
    const direct = fsConstants.O_DIRECT
    if (direct !== undefined) {
      const timed = await readAll(path, fsConstants.O_RDONLY | direct, total, chunkBytes, signal).catch((err: NodeJS.ErrnoException) => {
        log('O_DIRECT read of %s failed (%s): falling back to buffered reads', path, err.code ?? err.message)
        return null
      })
      if (timed !== null) return { bytes: total, ms: timed, directory, direct: true }
    }
    return { bytes: total, ms: await readAll(path, fsConstants.O_RDONLY, total, chunkBytes, signal), directory, direct: false }
  } finally {
    await unlink(path).catch(() => {})
  }
}

/**
 * Reads `total` bytes of `path` in chunks, ms. O_DIRECT needs a buffer aligned to the logical block size, and JS cannot
 * see buffer addresses: a first 4 KiB read tries offsets 0, 16, … 4080 into an over-allocated buffer until one is aligned.
 */
async function readAll(path: string, flags: number, total: number, chunkBytes: number, signal?: AbortSignal): Promise<number> {
  const fh = await open(path, flags)
  try {
    const buffer = Buffer.allocUnsafeSlow(chunkBytes + 4096)
    let offset = -1
    for (let candidate = 0; candidate < 4096; candidate += 16) {
      try {
        await fh.read(buffer, candidate, 4096, 0)
        offset = candidate
        break
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err
      }
    }
    if (offset < 0) throw Object.assign(new Error('no aligned buffer offset accepted'), { code: 'EINVAL' })
    const startMs = performance.now()
    for (let position = 0; position < total; position += chunkBytes) {
      signal?.throwIfAborted()
      const { bytesRead } = await fh.read(buffer, offset, chunkBytes, position)
      if (bytesRead !== chunkBytes) throw new Error(`short read of ${path}: ${bytesRead} bytes at ${position}`)
    }
    return performance.now() - startMs
  } finally {
    await fh.close()
  }
}

/**
 * Measures this device (see the module comment). Kernel sizes shrink on small memory (the f32 decode weight is at most
 * 1/16 of the available memory).
 * @throws RuntimeError when onnxruntime refuses a graph; the signal's reason when aborted; I/O errors of the disk probe
 */
export async function measureDevice(options: MeasureOptions = {}): Promise<MeasuredProfile> {
  const startMs = performance.now()
  const signal = options.signal
  const cores = hostCores()
  const memory = availableMemoryBytes()
  const threads = Math.max(1, Math.floor(cores.effective))
  const k = 4096
  const targetBytes = Math.min(options.decodeWeightBytes ?? 64 * MiB, Math.max(4 * MiB, memory.availableBytes / 16))
  const n = Math.max(256, Math.floor(targetBytes / (k * 4) / 32) * 32)
  const decodeF32 = await measureDecodeF32(k, n, threads, signal)
  // 4-bit weights are 5/32 of f32's bytes: 4× the rows keeps the read well beyond the caches.
  const decodeNBits = await measureDecodeNBits(k, n * 4, threads, signal)
  const prefill = await measurePrefill(64, 2048, 2048, threads, signal)
  const disk = await measureDiskRead(options.diskDirectory ?? tmpdir(), options.diskBytes ?? 64 * MiB, signal)
  const capabilities: DeviceCapabilities = {
    memoryBytes: memory.availableBytes,
    cores: cores.effective,
    decodeGBs: decodeF32.weightBytes / (decodeF32.medianMs * 1e6),
    decodeNBitsGBs: decodeNBits.weightBytes / (decodeNBits.medianMs * 1e6),
    prefillGflops: prefill.flops / (prefill.medianMs * 1e6),
    diskReadMBs: disk.bytes / (disk.ms * 1e3),
  }
  return {
    version: 2,
    key: profileCacheKey(),
    measuredAt: new Date().toISOString(),
    capabilities,
    details: {
      hostname: hostname(),
      logicalCores: cores.logical,
      cpuQuotaCores: cores.quotaCores,
      threads,
      decodeF32,
      decodeNBits,
      prefill,
      disk,
      freeMemoryBytes: memory.freeBytes,
      cgroupMemoryLimitBytes: memory.cgroupLimitBytes,
      loadAverage: loadavg()[0] ?? 0,
      durationMs: performance.now() - startMs,
    },
  }
}

/** The cached profile for `key` in the cache file at `path`, or undefined (missing, unreadable, malformed or another key). */
export function readCachedProfile(path: string, key: string = profileCacheKey()): MeasuredProfile | undefined {
  try {
    const doc = JSON.parse(readFileSync(path, 'utf8')) as { version?: unknown; profiles?: Record<string, unknown> }
    const entry = doc.profiles?.[key] as Partial<MeasuredProfile> | undefined
    if (doc.version !== 2 || !entry || entry.key !== key || typeof entry.measuredAt !== 'string') return undefined
    return { ...(entry as MeasuredProfile), capabilities: parseCapabilities(entry.capabilities) }
  } catch {
    return undefined
  }
}

/** Stores `profile` in the cache file at `path` (other hosts' entries kept), atomically (write then rename). */
export function writeCachedProfile(path: string, profile: MeasuredProfile): void {
  let profiles: Record<string, unknown> = {}
  try {
    const doc = JSON.parse(readFileSync(path, 'utf8')) as { version?: unknown; profiles?: Record<string, unknown> }
    if (doc.version === 2 && doc.profiles && typeof doc.profiles === 'object') profiles = doc.profiles
  } catch {}
  profiles[profile.key] = profile
  mkdirSync(dirname(path), { recursive: true })
  const tmp = `${path}.${process.pid}.tmp`
  writeFileSync(tmp, `${JSON.stringify({ version: 2, profiles }, null, 2)}\n`)
  renameSync(tmp, path)
}

/**
 * This device's profile: the cached one for this host (its `memoryBytes` refreshed to what is available now), or a
 * fresh measurement (stored in the cache) when there is none or `refresh` is set.
 * @returns the profile and whether it came from the cache
 */
export async function loadOrMeasureProfile(
  options: MeasureOptions & { readonly cachePath?: string; readonly refresh?: boolean } = {},
): Promise<{ profile: MeasuredProfile; cached: boolean }> {
  const path = options.cachePath ?? defaultProfileCachePath()
  if (!options.refresh) {
    const cached = readCachedProfile(path)
    if (cached) {
      const memoryBytes = availableMemoryBytes().availableBytes
      return { profile: { ...cached, capabilities: { ...cached.capabilities, memoryBytes } }, cached: true }
    }
  }
  const profile = await measureDevice(options)
  try {
    writeCachedProfile(path, profile)
  } catch (err) {
    log.error('cannot cache the device profile in %s: %s', path, (err as Error).message)
  }
  return { profile, cached: false }
}
