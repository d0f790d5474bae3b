/**
 * CPU shares for emulated devices: one cgroup per process with a CFS bandwidth quota (quota = share × period), as
 * the Linux scheduler documents it (Documentation/scheduler/sched-bwc.rst): cgroup v1 `cpu.cfs_quota_us` /
 * `cpu.cfs_period_us`, cgroup v2 `cpu.max` ("quota period"). Needs root (or a delegated cgroup) and the cpu
 * controller; where either is missing, {@link CpuQuotas.create} says why and nothing is constrained.
 */
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { logger } from '@libp2p/logger'

const log = logger('edgeshard:agent:cpu-quota')

/** CFS period of every group, µs (the kernel's default). */
export const CPU_PERIOD_US = 100_000
/** Smallest quota the kernel accepts, µs. */
const MIN_QUOTA_US = 1_000

interface Hierarchy {
  readonly version: 1 | 2
  /** Directory new groups are made in. */
  readonly root: string
}

/** Where a cpu controller can be used, or why not. */
function findHierarchy(): Hierarchy | string {
  if (process.platform !== 'linux') return `cgroups are Linux only (this is ${process.platform})`
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'not running as root'
  const v1 = '/sys/fs/cgroup/cpu'
  if (existsSync(join(v1, 'cpu.cfs_quota_us'))) return { version: 1, root: v1 }
  const v2 = '/sys/fs/cgroup'
  try {
    if (readFileSync(join(v2, 'cgroup.controllers'), 'utf8').split(/\s+/).includes('cpu')) return { version: 2, root: v2 }
  } catch {}
  return 'no cgroup cpu controller found (/sys/fs/cgroup/cpu or cgroup v2 with cpu)'
}

/**
 * A set of cgroups, one per constrained process, under one parent group named after this process. `stop()` moves any
 * process of this one back to the root group and removes the groups.
 */
export class CpuQuotas {
  readonly #hierarchy: Hierarchy
  readonly #parent: string
  readonly #groups: string[] = []
  /** The group this process started in. */
  readonly #home: string

  private constructor(hierarchy: Hierarchy, parent: string) {
    this.#hierarchy = hierarchy
    this.#parent = parent
    this.#home = ownGroup(hierarchy.version)
  }

  /** cgroup version in use. */
  get version(): 1 | 2 {
    return this.#hierarchy.version
  }

  /**
   * Makes the parent group `edgeshard-<pid>`.
   * @returns the quotas, or a sentence saying why CPU cannot be constrained here
   */
  static create(): CpuQuotas | string {
    const hierarchy = findHierarchy()
    if (typeof hierarchy === 'string') return hierarchy
    const parent = join(hierarchy.root, ownGroup(hierarchy.version), `edgeshard-${process.pid}`)
    try {
      mkdirSync(parent, { recursive: true })
      if (hierarchy.version === 2) {
        writeFileSync(join(hierarchy.root, ownGroup(2), 'cgroup.subtree_control'), '+cpu')
        writeFileSync(join(parent, 'cgroup.subtree_control'), '+cpu')
      }
    } catch (err) {
      return `cannot make a cgroup under ${hierarchy.root}: ${(err as Error).message}`
    }
    log('cpu quotas under %s (cgroup v%d)', parent, hierarchy.version)
    return new CpuQuotas(hierarchy, parent)
  }

  /**
   * Puts process `pid` (all its threads) in a new group `name` limited to `share` of one core.
   * @throws RangeError for a share that is not positive; the file system's error when the kernel refuses
   */
  limit(pid: number, name: string, share: number): void {
    if (!(share > 0) || !Number.isFinite(share)) throw new RangeError(`cannot give ${name} a CPU share of ${share}: must be > 0`)
    const dir = join(this.#parent, name.replace(/[^A-Za-z0-9._-]/g, '_'))
    mkdirSync(dir, { recursive: true })
    this.#groups.push(dir)
    const quotaUs = Math.max(MIN_QUOTA_US, Math.round(share * CPU_PERIOD_US))
    if (this.#hierarchy.version === 1) {
      writeFileSync(join(dir, 'cpu.cfs_period_us'), String(CPU_PERIOD_US))
      writeFileSync(join(dir, 'cpu.cfs_quota_us'), String(quotaUs))
    } else {
      writeFileSync(join(dir, 'cpu.max'), `${quotaUs} ${CPU_PERIOD_US}`)
    }
    writeFileSync(join(dir, 'cgroup.procs'), String(pid))
    log('pid %d in %s: %d µs per %d µs', pid, dir, quotaUs, CPU_PERIOD_US)
  }

  /**
   * Moves this process back to the group it started in and removes every group (their other processes must have
   * exited; a group the kernel still reports busy is retried for up to a second).
   */
  async stop(): Promise<void> {
    try {
      writeFileSync(join(this.#hierarchy.root, this.#home, 'cgroup.procs'), String(process.pid))
    } catch (err) {
      log('cannot move pid %d back to its cgroup: %s', process.pid, (err as Error).message)
    }
    for (const dir of [...this.#groups.reverse(), this.#parent]) {
      for (let attempt = 0; ; attempt++) {
        try {
          rmdirSync(dir)
          break
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EBUSY' || attempt >= 20) {
            log('cannot remove cgroup %s: %s', dir, (err as Error).message)
            break
          }
          await new Promise((resolve) => setTimeout(resolve, 50))
        }
      }
    }
    this.#groups.length = 0
  }
}

/** This process's group in the hierarchy (from /proc/self/cgroup), relative to its root; `/` when unknown. */
function ownGroup(version: 1 | 2): string {
  try {
    for (const line of readFileSync('/proc/self/cgroup', 'utf8').split('\n')) {
      const [, controllers, path] = line.split(':')
      if (path === undefined) continue
      if (version === 2 ? controllers === '' : controllers!.split(',').includes('cpu')) return path
    }
  } catch {}
  return '/'
}
