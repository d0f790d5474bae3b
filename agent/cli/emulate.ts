/**
 * `edgeshard emulate --cluster cluster.json [run options]`: a whole cluster on this machine, each agent constrained
 * like its device in the cluster file (devices/cluster-file.ts): device 0 is this process (the master), devices
 * 1..N-1 are local agent processes. Links: every byte between two agents crosses a userspace link emulator
 * (transport/link-shaper.ts: half the round trip each way plus the rate, shaped by the sender). CPU: a cgroup CPU
 * quota per process (its `cpu` share of one core) where root and a cpu controller allow, otherwise a warning that CPU
 * is unconstrained. Memory: the device's budget becomes the agent's `--memory-budget`. Then it plans (`--plan`,
 * default auto: the planner on the file's profiles and links; with `--probe-links` on every link as measured between
 * the processes, with `--profiles measured` on the profile each agent measures under its CPU share and publishes; the
 * memory budgets are always the file's) and generates as `run` does.
 */
import type { ChildProcess } from 'node:child_process'
import { type Command, Option } from 'commander'
import { type ClusterSpec, clusterLink, readClusterFile } from '../../devices/index.ts'
import type { LinkEmulation } from '../../transport/index.ts'
import { CpuQuotas } from '../cpu-quota.ts'
import { UsageError } from '../errors.ts'
import { type LocalWorkers, spawnLocalWorkers } from '../local-workers.ts'
import { withSurvey } from '../surveyed-cluster.ts'
import { plannedFor, planningOptions } from './plan.ts'
import type { ClusterFlags, ClusterSetup } from './start-cluster.ts'

/** The flags `emulate` adds to those of `run`. */
export interface EmulateFlags extends ClusterFlags {
  /** `--cluster FILE.json`. */
  cluster: string
  /** `--profiles file|measured`: what `--plan auto` takes device speeds from (default file). */
  profiles?: 'file' | 'measured'
}

/**
 * The link emulation of a cluster file: the link between devices `from` and `to` (symmetric), as the shaper takes it.
 */
export function emulatedLinks(spec: ClusterSpec): (from: number, to: number) => LinkEmulation {
  return (from, to) => {
    const link = clusterLink(spec, from, to)
    return { rttMs: link.rttMs, bitsPerSecond: link.mbps * 1e6 }
  }
}

/**
 * Registers `emulate`. `addOptions` adds the options of `run` (generation and cluster flags); `run` generates on a
 * cluster started with the setup given.
 */
export function registerEmulate<F extends EmulateFlags>(
  program: Command,
  addOptions: (command: Command) => Command,
  run: (flags: F, setup: ClusterSetup) => Promise<void>,
): void {
  const command = program
    .command('emulate')
    .description('emulate a cluster file on this machine (an agent per device, link latency and rate, CPU quotas, memory budgets) and generate')
    .requiredOption('--cluster <file>', 'cluster file (JSON: devices with profile, cpu and memoryBudget; links)')
    .addOption(
      new Option('--profiles <source>', "device speeds for --plan auto: the cluster file's profiles, or what each agent measures under its CPU share and publishes")
        .choices(['file', 'measured'])
        .default('file'),
    )
  addOptions(command).action((flags: F) => emulate(flags, run))
}

/**
 * Starts the emulated cluster of `flags.cluster` and generates on it with `run`.
 * @throws UsageError for flags that pick workers (the file does); ClusterFileError for a bad file; whatever `run` throws
 */
export async function emulate<F extends EmulateFlags>(flags: F, run: (flags: F, setup: ClusterSetup) => Promise<void>): Promise<void> {
  if (flags.peers !== undefined || flags.workers !== undefined || flags.discover !== undefined || flags.bootstrap !== undefined) {
    throw new UsageError('emulate takes its devices from --cluster: drop --peers, --workers, --discover and --bootstrap')
  }
  if (flags.memoryBudget !== undefined) {
    throw new UsageError("emulate takes memory budgets from --cluster (each device's memoryBudget): drop --memory-budget")
  }
  const spec = readClusterFile(flags.cluster)
  const auto = (flags.plan ?? 'auto') === 'auto' && flags.planFile === undefined
  if (flags.profiles === 'measured' && !auto) throw new UsageError('--profiles measured is what --plan auto plans from: drop it, or plan with --plan auto')
  const status = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`edgeshard: ${line}\n`)
  }
  const wantsCpu = spec.devices.some((d) => d.cpu !== undefined)
  const quotas = wantsCpu ? CpuQuotas.create() : null
  if (typeof quotas === 'string') process.stderr.write(`edgeshard: warning: CPU is unconstrained (${quotas}); the devices' cpu shares are ignored\n`)
  const cpu = quotas instanceof CpuQuotas ? quotas : null
  if (cpu && cpu.removedStale.length > 0) {
    status(`removed ${cpu.removedStale.length} stale cgroup${cpu.removedStale.length === 1 ? '' : 's'} of emulators that are gone: ${cpu.removedStale.join(', ')}`)
  }
  // Interrupted: stop the workers (they exit with their stdin) and remove the groups before going.
  const interrupted = (): void => {
    for (const child of workerProcesses) child.kill('SIGKILL')
    void (cpu?.stop() ?? Promise.resolve()).finally(() => process.exit(130))
  }
  const workerProcesses: ChildProcess[] = []
  if (cpu) {
    process.once('SIGINT', interrupted)
    process.once('SIGTERM', interrupted)
  }
  const links = emulatedLinks(spec)
  for (const [i, d] of spec.devices.entries()) {
    const share = d.cpu === undefined ? 'unconstrained' : `${d.cpu} core${cpu ? '' : ' (not enforced)'}`
    status(`device ${i}${i === 0 ? ' (master)' : ''}: ${d.name}, profile ${d.profile}, CPU ${share}, memory budget ${d.memoryBudgetBytes} bytes`)
  }
  const rows = spec.devices.flatMap((a, i) => spec.devices.slice(i + 1).map((b, k) => ({ a, b, link: links(i, i + 1 + k) })))
  for (const { a, b, link } of rows) status(`link ${a.name} ↔ ${b.name}: rtt ${link.rttMs} ms, ${link.bitsPerSecond / 1e6} Mbit/s`)
  // The master's quota applies once its workers are spawned (a child starts in its parent's group).
  const limitMaster = (): void => {
    const master = spec.devices[0]!
    if (cpu && master.cpu !== undefined) cpu.limit(process.pid, master.name, master.cpu)
  }
  try {
    if (spec.devices.length === 1) limitMaster()
    const setup: ClusterSetup = {
      links,
      deviceNames: spec.devices.map((d) => d.name),
      deviceBudgets: spec.devices.map((d) => d.memoryBudgetBytes),
      measuredProfiles: flags.profiles === 'measured',
      // Measured links (--probe-links) and profiles (--profiles measured) replace the file's; budgets stay the file's.
      autoPlan: (model, _nDevices, survey) =>
        plannedFor(survey ? withSurvey(spec, survey, { links: survey.links.length > 0, profiles: survey.profiles.length > 0 }) : spec, model, planningOptions(flags)),
      spawnWorkers: async (count, agentArgs): Promise<LocalWorkers> => {
        const workers = await spawnLocalWorkers(count, {
          agentArgs: (i) => [...agentArgs(i), '--memory-budget', String(spec.devices[i]!.memoryBudgetBytes)],
        })
        workerProcesses.push(...workers.processes)
        try {
          for (const [k, child] of workers.processes.entries()) {
            const device = spec.devices[k + 1]!
            if (cpu && device.cpu !== undefined && child.pid) cpu.limit(child.pid, device.name, device.cpu)
          }
          limitMaster()
        } catch (err) {
          await workers.stop(0)
          throw err
        }
        return workers
      },
    }
    const planFlags = flags.plan === undefined && flags.planFile === undefined ? { plan: 'auto' } : {}
    await run({ ...flags, ...planFlags, peers: spec.devices.length, memoryBudget: spec.devices[0]!.memoryBudgetBytes }, setup)
  } finally {
    process.off('SIGINT', interrupted)
    process.off('SIGTERM', interrupted)
    await cpu?.stop()
  }
}
