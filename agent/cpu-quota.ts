/**
 * CPU shares for emulated devices: one cgroup per process with a CFS bandwidth quota (quota = share × period), as
 * the Linux scheduler documents it (Documentation/scheduler/sched-bwc.rst): cgroup v1 `cpu.cfs_quota_us` /
 * `cpu.cfs_period_us`, cgroup v2 `cpu.max` ("quota period"). Needs root (or a delegated cgroup) and the cpu
 * controller; where either is missing, {@link CpuQuotas.create} says why and nothing is constrained.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { logger } from '@libp2p/logger'

const log = logger('edgeshard:agent:cpu-quota')

/**
 * Shortest CFS period of a group, µs. Not the kernel's default of 100 ms: a quota only caps the CPU used per period,
 * so a process that works in bursts shorter than its quota runs them at full speed — under a 100 ms period a ¼-core
 * device (25 ms of quota) is a whole core for a pipeline stage that computes for 20 ms and then waits, and a decode
 * block of 1 ms runs at full speed unless it meets the throttle. Measured here (cgroup v1, a ¼ share, a burst of
 * CPU work after 200 ms idle): 13 ms of work took 14–24 ms of wall time under a 100 ms period, 38–50 ms under 10 ms,
 * 47–64 ms under 4 ms (the share's 52 ms); 3 ms took ≈ 3, ≈ 5 and ≈ 11 ms. A share whose quota would fall below the
 * kernel's 1 ms minimum gets a longer period.
 */
export const CPU_PERIOD_US = 4_000
/** Smallest quota the kernel accepts, µs (a share too small for it gets a longer period). */
const MIN_QUOTA_US = 1_000
/** Longest period the kernel accepts, µs. */
const MAX_PERIOD_US = 1_000_000

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

/** Name of the parent group a process makes: `edgeshard-<pid>`. */
const PARENT_GROUP = /^edgeshard-(\d+)$/

/** A group younger than this is never taken for stale (its maker may be in another pid namespace, just starting), ms. */
export const STALE_GROUP_MIN_AGE_MS = 2_000

/**
 * True while process `pid` runs: signal 0 fails with ESRCH when it does not (EPERM means it does, owned by someone
 * else); a zombie (killed, not yet reaped by its parent: Linux `/proc/<pid>/stat` state Z) counts as gone.
 */
function processRuns(pid: number): boolean {
  try {
    process.kill(pid, 0)
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ESRCH'
  }
  try {
    return !/^\d+ \(.*\) Z/s.test(readFileSync(`/proc/${pid}/stat`, 'utf8'))
  } catch {
    return true
  }
}

/**
 * Removes the groups `edgeshard-<pid>` (and their device groups) left behind by emulators that died without cleaning
 * up (SIGKILL, a crash), under `directories` of the hierarchy: only where `<pid>` no longer exists, the group is at
 * least `minAgeMs` old, and it is empty — the kernel refuses to remove a group that still holds a process, so a group
 * whose workers live on is kept (and retried by a later call).
 * @returns the groups removed
 */
export function removeStaleGroups(directories: readonly string[], minAgeMs = STALE_GROUP_MIN_AGE_MS): string[] {
  const removed: string[] = []
  for (const directory of new Set(directories)) {
    let entries: string[]
    try {
      entries = readdirSync(directory)
    } catch {
      continue
    }
    for (const entry of entries) {
      const pid = Number(PARENT_GROUP.exec(entry)?.[1])
      if (!Number.isSafeInteger(pid) || pid === process.pid || processRuns(pid)) continue
      const group = join(directory, entry)
      try {
        if (Date.now() - statSync(group).mtimeMs < minAgeMs) continue
        for (const child of readdirSync(group, { withFileTypes: true })) if (child.isDirectory()) rmdirSync(join(group, child.name))
        rmdirSync(group)
        removed.push(group)
        log('removed stale cgroup %s (pid %d is gone)', group, pid)
      } catch (err) {
        log('cannot remove stale cgroup %s: %s', group, (err as Error).message)
      }
    }
  }
  return removed
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
  /** Stale groups of dead emulators removed when this one was made (see {@link removeStaleGroups}). */
  readonly removedStale: readonly string[]

  private constructor(hierarchy: Hierarchy, parent: string, removedStale: readonly string[]) {
    this.#hierarchy = hierarchy
    this.#parent = parent
    this.#home = ownGroup(hierarchy.version)
    this.removedStale = removedStale
  }

  /** cgroup version in use. */
  get version(): 1 | 2 {
    return this.#hierarchy.version
  }

  /**
   * Removes the stale groups of dead emulators (in the hierarchy's root and this process's group), then makes the
   * parent group `edgeshard-<pid>`.
   * @returns the quotas, or a sentence saying why CPU cannot be constrained here
   */
  static create(): CpuQuotas | string {
    const hierarchy = findHierarchy()
    if (typeof hierarchy === 'string') return hierarchy
    const home = join(hierarchy.root, ownGroup(hierarchy.version))
    const removedStale = removeStaleGroups([home, hierarchy.root])
    const parent = join(home, `edgeshard-${process.pid}`)
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
    return new CpuQuotas(hierarchy, parent, removedStale)
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
    const periodUs = Math.min(MAX_PERIOD_US, Math.max(CPU_PERIOD_US, Math.ceil(MIN_QUOTA_US / share)))
    const quotaUs = Math.max(MIN_QUOTA_US, Math.round(share * periodUs))
    if (this.#hierarchy.version === 1) {
      writeFileSync(join(dir, 'cpu.cfs_period_us'), String(periodUs))
      writeFileSync(join(dir, 'cpu.cfs_quota_us'), String(quotaUs))
    } else {
      writeFileSync(join(dir, 'cpu.max'), `${quotaUs} ${periodUs}`)
    }
    writeFileSync(join(dir, 'cgroup.procs'), String(pid))
    log('pid %d in %s: %d µs per %d µs', pid, dir, quotaUs, periodUs)
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
