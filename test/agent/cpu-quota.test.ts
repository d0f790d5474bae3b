/**
 * Stale CPU cgroups: an emulator killed with SIGKILL cannot remove its `edgeshard-<pid>` groups; the next one removes
 * the groups of emulators that are gone, once they are empty. Needs root and a cgroup v1 cpu controller (the
 * hierarchy these machines have); skipped with a message otherwise.
 */
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, rmdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { removeStaleGroups } from '../../agent/cpu-quota.ts'
import { CLI, childPids, HAVE_MODELS, MODELS_DIR, processAlive, runCli, waitFor } from '../support/cli.ts'

const ROOT = '/sys/fs/cgroup/cpu'
const CGROUP_V1 = process.platform === 'linux' && process.getuid?.() === 0 && existsSync(join(ROOT, 'cpu.cfs_quota_us'))
if (!CGROUP_V1) process.stderr.write('skipping the stale cgroup tests: they need root and a cgroup v1 cpu controller at /sys/fs/cgroup/cpu\n')

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-cgroups-'))
const made: string[] = []
afterAll(() => {
  for (const group of made.reverse()) {
    try {
      rmdirSync(group)
    } catch {}
  }
  rmSync(dir, { recursive: true, force: true })
})

/** The pid of a process that has exited (and is checked not to have been reused). */
function deadPid(): number {
  const pid = spawnSync('true').pid
  expect(processAlive(pid)).toBe(false)
  return pid
}

describe.skipIf(!CGROUP_V1)('stale edgeshard cgroups (root, cgroup v1)', () => {
  it('removes the empty groups of dead processes, keeps live owners, groups still holding a process, and young groups', async () => {
    const stale = join(ROOT, `edgeshard-${deadPid()}`)
    mkdirSync(join(stale, 'pi-a'), { recursive: true })
    made.push(stale, join(stale, 'pi-a'))
    const own = join(ROOT, `edgeshard-${process.pid}`) // this process's: never stale
    const sleeper = spawn('sleep', ['30'], { stdio: 'ignore' })
    const owned = join(ROOT, `edgeshard-${sleeper.pid}`) // its owner is alive
    const busy = join(ROOT, `edgeshard-${deadPid()}`) // owner gone, a process still inside
    for (const g of [own, owned, join(busy, 'w')]) mkdirSync(g, { recursive: true })
    made.push(own, owned, busy, join(busy, 'w'))
    writeFileSync(join(busy, 'w', 'cgroup.procs'), String(sleeper.pid))
    try {
      expect(removeStaleGroups([ROOT], 60_000)).not.toContain(stale) // too young
      const removed = removeStaleGroups([ROOT], 0)
      expect(removed).toContain(stale)
      expect(existsSync(stale)).toBe(false)
      expect(existsSync(own)).toBe(true)
      expect(existsSync(owned)).toBe(true)
      expect(existsSync(join(busy, 'w'))).toBe(true)
    } finally {
      sleeper.kill('SIGKILL')
    }
    // Dead, reaped or not (a zombie counts as gone).
    await waitFor(() => !processAlive(sleeper.pid!), 5_000)
    expect(removeStaleGroups([ROOT], 0)).toEqual(expect.arrayContaining([busy, owned]))
    expect([busy, owned].some(existsSync)).toBe(false)
  }, 20_000)

  it.skipIf(!HAVE_MODELS)('an emulator killed with SIGKILL leaves its groups; the next emulate removes them', async () => {
    const cluster = join(dir, 'two.cluster.json')
    writeFileSync(
      cluster,
      JSON.stringify({ devices: [{ name: 'm', profile: 'laptop', cpu: 1 }, { name: 'w', profile: 'laptop', cpu: 1 }], links: { default: { rttMs: 1, mbps: 1000 } } }),
    )
    const model = join(MODELS_DIR, 'stories260K.bin')
    const child = spawn(process.execPath, [CLI, 'emulate', '--cluster', cluster, '--model', model, '--plan', 'tp', '--max-tokens', '100000', '--temperature', '0.9'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let stdout = ''
    child.stdout.on('data', (b: Buffer) => {
      stdout += b.toString()
    })
    child.stderr.resume()
    const group = join(ROOT, `edgeshard-${child.pid}`)
    expect(await waitFor(() => stdout.length > 20, 30_000)).toBe(true) // generating, its groups made
    expect(existsSync(join(group, 'w'))).toBe(true)
    const workers = childPids(child.pid!)
    child.kill('SIGKILL')
    // Its workers follow it (stdin closed); its groups stay behind.
    expect(await waitFor(() => workers.every((pid) => !processAlive(pid)), 10_000)).toBe(true)
    expect(existsSync(group)).toBe(true)
    made.push(group, join(group, 'm'), join(group, 'w'))
    await new Promise((r) => setTimeout(r, 2_100)) // older than STALE_GROUP_MIN_AGE_MS
    const next = await runCli(['emulate', '--cluster', cluster, '--model', model, '--plan', 'tp', '--max-tokens', '1'], { timeoutMs: 60_000 })
    expect(next.code).toBe(0)
    expect(next.stderr).toMatch(new RegExp(`removed \\d+ stale cgroups? of emulators that are gone: .*${group}`))
    expect(existsSync(group)).toBe(false)
  }, 90_000)
})
