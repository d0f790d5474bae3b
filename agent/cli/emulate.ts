/**
 * `edgeshard emulate --cluster cluster.json [run options]`: a whole cluster on this machine, each agent constrained
 * like its device in the cluster file (devices/cluster-file.ts): device 0 is this process (the master), devices
 * 1..N-1 are local agent processes. Links: every byte between two agents crosses a userspace link emulator
 * (transport/link-shaper.ts: half the round trip each way plus the rate, shaped by the sender). CPU: a cgroup CPU
 * quota per process (its `cpu` share of one core) where root and a cpu controller allow, otherwise a warning that CPU
 * is unconstrained. Memory: the device's budget becomes the agent's `--memory-budget`. Then it plans (`--plan`,
 * default auto: the planner on the file's profiles and links) and generates as `run` does.
 */
import type { ChildProcess } from 'node:child_process'
import type { Command } from 'commander'
import { type ClusterSpec, clusterLink, readClusterFile } from '../../devices/index.ts'
import { type ClusterPlan, type ModelDescription, planClusterChoice } from '../../splitter/index.ts'
import type { LinkEmulation } from '../../transport/index.ts'
import type { Cluster } from '../cluster.ts'
import { CpuQuotas } from '../cpu-quota.ts'
import { UsageError } from '../errors.ts'
import { type LocalWorkers, spawnLocalWorkers } from '../local-workers.ts'
import { clusterPlanInput } from './plan.ts'
import type { ClusterFlags, ClusterSetup } from './start-cluster.ts'

/** The flags `emulate` adds to those of `run`. */
export interface EmulateFlags extends ClusterFlags {
  /** `--cluster FILE.json`. */
  cluster: string
  /** `--probe-links`: measure the master's link to every worker before generating. */
  probeLinks?: boolean
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
 * The planner's choice for the devices and links of `spec` (their profiles' decode rates and memory budgets), as
 * `edgeshard plan` makes it.
 * @throws InsufficientMemoryError (from the planner) when no plan fits the budgets
 */
export function plannedFor(spec: ClusterSpec, model: ModelDescription, quantizedMatmul: 'exact' | 'int8' = 'exact'): ClusterPlan {
  return planClusterChoice(clusterPlanInput(model, spec, { quantizedMatmul })).chosen
}

/**
 * Measures the master's link to every worker and prints it beside the emulated one:
 * `edgeshard: link laptop → pi-a measured: rtt 20.31 ms (emulated 20), 49.6 Mbit/s (emulated 50)`.
 * Throughput probes take about a quarter second each at the emulated rate.
 */
async function probeEmulatedLinks(cluster: Cluster, spec: ClusterSpec, links: (from: number, to: number) => LinkEmulation): Promise<void> {
  const measured = await cluster.probeLinks((device) => ({
    rounds: 10,
    payloadRounds: 3,
    payloadBytes: Math.round(Math.min(8 * 2 ** 20, Math.max(64 * 2 ** 10, (links(0, device).bitsPerSecond * 0.25) / 8))),
  }))
  for (const { device, link } of measured) {
    const set = links(0, device)
    process.stderr.write(
      `edgeshard: link ${spec.devices[0]!.name} → ${spec.devices[device]!.name} measured: rtt ${link.rttMs.toFixed(2)} ms (emulated ${set.rttMs}), ` +
        `${link.mbps.toFixed(1)} Mbit/s (emulated ${set.bitsPerSecond / 1e6})\n`,
    )
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
    .option('--probe-links', "measure the master's emulated link to every worker (round trip, throughput) before generating")
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
  const status = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`edgeshard: ${line}\n`)
  }
  const wantsCpu = spec.devices.some((d) => d.cpu !== undefined)
  const quotas = wantsCpu ? CpuQuotas.create() : null
  if (typeof quotas === 'string') process.stderr.write(`edgeshard: warning: CPU is unconstrained (${quotas}); the devices' cpu shares are ignored\n`)
  const cpu = quotas instanceof CpuQuotas ? quotas : null
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
      ...(flags.probeLinks ? { onStarted: (cluster: Cluster) => probeEmulatedLinks(cluster, spec, links) } : {}),
      autoPlan: (model) => plannedFor(spec, model, flags.quantizedMatmul),
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
