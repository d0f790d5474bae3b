/**
 * Cluster start-up shared by `run` and `serve`: the cluster flags, then model and tokenizer, the workers (spawned
 * locally, given, or discovered), the plan check, shard distribution with progress, and a stop that ends it all.
 */
import { existsSync, writeFileSync } from 'node:fs'
import { cpus } from 'node:os'
import { fileURLToPath } from 'node:url'
import { type Command, Option } from 'commander'
import { type ClusterPlan, loadModel, type ModelDescription } from '../../splitter/index.ts'
import { type LinkEmulation, type TransportNodeOptions, WIRE_DTYPES, type WireDtype } from '../../transport/index.ts'
import { Cluster, type RecoveryReport } from '../cluster.ts'
import { type DiscoverOptions, discoverAgents } from '../discovery.ts'
import { DiscoveryError, UsageError } from '../errors.ts'
import { type LocalWorkers, pinToCore, spawnLocalWorkers } from '../local-workers.ts'
import { DEFAULT_PEER_DEADLINE_MS } from '../peer-deadline.ts'
import type { AgentProbe } from '../peer-info.ts'
import { loadTokenizer, type MasterTokenizer } from '../tokenizer/load-tokenizer.ts'
import { byteSize, collect, wholeNumber } from './arguments.ts'
import { createClusterProgress } from './cluster-progress.ts'
import type { ClusterSurvey } from '../link-survey.ts'
import { checkPlanFits } from '../plan-fit.ts'
import { surveyedClusterSpec } from '../surveyed-cluster.ts'
import { surveyForPlanning } from './cluster-survey.ts'
import { plannedFor, planningOptions } from './plan.ts'
import { describePlan, PLAN_HELP, resolvePlan } from './plan-option.ts'
import { addSecurityOptions, loadSecurity, localWorkerIdentities, type SecurityFlags } from './security.ts'

/** Where `npm start` finds its default model: ../shared/models beside the repository. */
export const DEFAULT_MODEL = fileURLToPath(new URL('../../../shared/models/stories260K.bin', import.meta.url))

/** Default time `--discover` listens for agents, ms. */
export const DEFAULT_DISCOVER_TIMEOUT_MS = 5000

/** The flags `addClusterOptions` defines (identity and membership: see security.ts). */
export interface ClusterFlags extends SecurityFlags {
  model?: string
  tokenizer?: string
  peers?: number
  workers?: string
  /** `--discover` (true) or `--discover N`. */
  discover?: boolean | number
  bootstrap?: string[]
  discoverTimeout?: number
  threads?: number
  /** `--layers-per-graph N`: decoder layers per graph on a peer alone in its stage (0: per block). */
  layersPerGraph?: number
  context?: number
  memoryBudget?: number
  /** `--shard-dir DIR`: where the master's shard files go with --memory-budget (kept). */
  shardDir?: string
  /** `--quantized-matmul exact|int8`. */
  quantizedMatmul?: 'exact' | 'int8'
  /** `--wire-dtype f32|f16`: element type of allreduce tensors on the wire (see ClusterOptions.wireDtype). */
  wireDtype?: WireDtype
  /** `--pin-cores`: local peers each on their own core (master on core 0, worker i on core i mod cores). */
  pinCores?: boolean
  quiet?: boolean
  /** `--trace FILE.json`: Chrome trace events of every peer, written when the cluster stops. */
  trace?: string
  /** `--plan tp|pipeline|hybrid|auto|STAGES` (see plan-option.ts). */
  plan?: string
  /** `--plan-file FILE.json`: a cluster plan (e.g. from `edgeshard plan`). */
  planFile?: string
  /** `--peer-deadline MS`: base deadline of a silent worker (see peer-deadline.ts). */
  peerDeadline?: number
  /** false with `--no-recover`: fail on the first lost worker instead of re-planning. */
  recover?: boolean
  /** `--recovery adopt|even`: how a lost worker is replaced (see ClusterOptions.recovery). */
  recovery?: 'adopt' | 'even'
  /** `--probe-links`: measure every link before planning (see cluster-survey.ts); `--plan auto` plans with them. */
  probeLinks?: boolean
}

/** What `edgeshard emulate` changes in a cluster's start (see emulate.ts); `run` and `serve` use the defaults. */
export interface ClusterSetup {
  /**
   * Starts the local workers instead of `spawnLocalWorkers` (e.g. each with its own memory budget and CPU quota);
   * `agentArgs` are their identity and membership flags.
   */
  readonly spawnWorkers?: (count: number, agentArgs: (index: number) => readonly string[]) => Promise<LocalWorkers>
  /** Emulated links between devices (0 = master, i = worker i). */
  readonly links?: (from: number, to: number) => LinkEmulation | undefined
  /**
   * The plan `--plan auto` picks for the model over that many devices, given what the survey measured (links with
   * `--probe-links`, profiles with `measuredProfiles`). Absent (`run`, `serve`): `--plan auto` plans from a survey of
   * every link and every device's published measurement.
   */
  readonly autoPlan?: (model: ModelDescription, nDevices: number, survey?: ClusterSurvey) => ClusterPlan
  /** `--plan auto` wants every device's published measurement (`emulate --profiles measured`). */
  readonly measuredProfiles?: boolean
  /** Device names (0 = master), checked against a plan file's; default `master`, `worker-1`, … (not checked). */
  readonly deviceNames?: readonly string[]
  /** Each device's memory budget (`emulate`: the cluster file's), checked against the plan before anything starts. */
  readonly deviceBudgets?: readonly number[]
}

/** Adds the cluster flags (model, peers/workers/discovery, threads, context, memory, quiet) to `command`. */
export function addClusterOptions(command: Command): Command {
  addSecurityOptions(command)
  return command
    .option('--model <path>', 'llama2.c checkpoint (.bin) or GGUF file (default: ../shared/models/stories260K.bin)')
    .option('--tokenizer <path>', 'llama2.c tokenizer.bin (default: tok<vocab>.bin or tokenizer.bin beside a .bin model)')
    .addOption(new Option('--peers <n>', 'peers on this machine, the master included (spawns n-1 workers; default 3)').argParser(wholeNumber(1)))
    .option('--workers <addrs>', 'comma-separated multiaddrs of running `edgeshard agent`s to use instead of local workers')
    .addOption(
      new Option('--discover [count]', 'use the idle agents found on the LAN by mDNS (and at --bootstrap); with a count, start once that many answer').argParser(
        wholeNumber(1),
      ),
    )
    .option('--bootstrap <addrs>', 'agents to ask directly where mDNS does not reach (implies --discover; repeatable, comma-separated)', collect)
    .addOption(
      new Option('--discover-timeout <ms>', 'how long --discover listens for agents').argParser(wholeNumber(1)).default(DEFAULT_DISCOVER_TIMEOUT_MS),
    )
    .addOption(new Option('--context <n>', 'context length in positions (default: what the model file declares)').argParser(wholeNumber(1)))
    .addOption(new Option('--threads <n>', 'onnxruntime threads per peer (default: cores / local peers)').argParser(wholeNumber(1)))
    .addOption(
      new Option('--layers-per-graph <n>', 'most decoder layers per onnxruntime graph on a peer alone in its stage (default: all; 0: one graph per attention and FFN block)')
        .argParser(wholeNumber(0)),
    )
    .addOption(
      new Option('--memory-budget <bytes>', 'weights + KV cache per peer (e.g. 512MB, 2GiB); larger shards stream from disk').argParser(byteSize),
    )
    .option('--shard-dir <dir>', "where the master's shard files go with --memory-budget, kept after the run (default: a temporary folder removed at exit)")
    .addOption(
      new Option('--quantized-matmul <mode>', 'activations of Q4_0/Q8_0 matmuls: int8 blocks as llama.cpp (faster), or exact f32')
        .choices(['exact', 'int8'])
        .default('int8'),
    )
    .addOption(
      new Option('--wire-dtype <dtype>', 'allreduce partials and sums on the wire: f32 (exact) or f16 (half the bytes, rounded; see the README)')
        .choices(WIRE_DTYPES)
        .default('f32'),
    )
    .option('--pin-cores', 'pin each local peer to its own core (Linux taskset; master on core 0)')
    .option('--quiet', 'no status lines or progress bars on stderr')
    .option('--trace <file>', 'write Chrome trace events of every peer (compute, allreduce, I/O, network, tokens) to this JSON file on exit')
    .option('--plan <plan>', PLAN_HELP)
    .option('--plan-file <file>', 'execute this cluster plan (JSON, e.g. from `edgeshard plan --json`)')
    .option('--probe-links', 'measure every link (master ↔ worker and worker ↔ worker: rtt, throughput) over libp2p before planning; --plan auto plans with the measurements')
    .addOption(
      new Option('--peer-deadline <ms>', 'a worker silent this long (plus an allowance for long prompts) is treated as lost')
        .argParser(wholeNumber(1))
        .default(DEFAULT_PEER_DEADLINE_MS),
    )
    .option('--no-recover', 'fail when a worker is lost instead of re-planning over the others and carrying on')
    .addOption(
      new Option('--recovery <mode>', 'replace a lost worker: adopt (the master takes over its shard from the model file) or even (re-plan evenly, re-send every shard)')
        .choices(['adopt', 'even'])
        .default('adopt'),
    )
}

/**
 * The one line the CLI prints after a recovery, e.g. `worker 2 (peer 12D3…) lost (stalled 1012 ms): re-planned over
 * 2 peers by the planner (pipeline, one device per stage, …, 1.21 ms/token predicted), KV rebuilt for 37 positions in
 * 81 ms (recovery 450 ms: detect 5, abort 3, re-plan 1, re-shard 280, rebuild 81)`, `…: re-planned over 2 peers with an
 * even split (worker 1 published no measured profile), …`, or, when the master took the shard over, `…: the master
 * took over its shard (3 peers left; it runs shards 0, 2), KV rebuilt …`.
 */
export function describeRecovery(r: RecoveryReport): string {
  const ms = (v: number): string => v.toFixed(0)
  const lost = r.lost
    .map((w) => `worker ${w.device} (peer ${w.peer}) lost (${w.kind === 'stalled' ? `stalled ${ms(w.silentMs)} ms` : w.report !== undefined ? `failed: ${w.report}` : 'went away'})`)
    .join(', ')
  const adopted = r.lost.length === 1 ? 'its shard' : 'their shards'
  const where =
    r.strategy === 'adopt'
      ? `the master took over ${adopted} (${r.peers > 1 ? `${r.peers} peers left` : 'it continues alone'}; it runs shards ${r.masterShards.join(', ')})`
      : r.peers > 1
        ? `re-planned over ${r.peers} peers ${r.replan?.by === 'planner' ? `by the planner (${r.replan.why})` : `with an even split${r.replan ? ` (${r.replan.why})` : ''}`}`
        : 'the master continues alone'
  return (
    `${lost}: ${where}, KV rebuilt for ${r.positions} positions in ${ms(r.rebuildMs)} ms ` +
    `(recovery ${ms(r.totalMs)} ms: detect ${ms(r.detectMs)}, abort ${ms(r.abortMs)}, re-plan ${ms(r.replanMs)}, re-shard ${ms(r.reshardMs)}, rebuild ${ms(r.rebuildMs)})`
  )
}

/** A running cluster with what the master needs to generate. */
export interface StartedCluster {
  readonly model: ModelDescription
  readonly tokenizer: MasterTokenizer
  readonly cluster: Cluster
  /** Peers, the master included. */
  readonly peers: number
  /** Addresses of the running agents it was started with (`--workers`, or found by discovery); none for local workers. */
  readonly workerAddresses: readonly string[]
  /** The master's libp2p identity and membership (to reach more agents as a member). */
  readonly transport: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
  /** Status lines (stderr, unless --quiet). */
  readonly status: (line: string) => void
  /** Stops the cluster and any local workers. */
  stop(): Promise<void>
}

/**
 * Starts a cluster from the flags. Workers: `--workers` as given; `--discover`/`--bootstrap` the idle agents found
 * (most free memory first); otherwise `--peers N` (default 3) local worker processes.
 * @throws UsageError for contradictory flags or a missing model; RangeError from the planner (before any process
 *   starts); DiscoveryError when discovery finds too few agents; DialError / PeerFailedError from the cluster.
 */
export async function startCluster(flags: ClusterFlags, setup: ClusterSetup = {}): Promise<StartedCluster> {
  const modelPath = flags.model ?? DEFAULT_MODEL
  if (!flags.model && !existsSync(modelPath)) {
    throw new UsageError(`no --model given and the default ${modelPath} does not exist; pass --model PATH (a llama2.c .bin checkpoint or a .gguf file)`)
  }
  const discover = flags.discover !== undefined || (flags.bootstrap?.length ?? 0) > 0
  if ([flags.peers !== undefined, flags.workers !== undefined, discover].filter(Boolean).length > 1) {
    throw new UsageError('give one of --peers N (local workers), --workers ADDR,... (running agents) or --discover/--bootstrap (agents found on the network)')
  }
  const loaded = loadModel(modelPath)
  // --context overrides the context length the file declares (llama.cpp's -c), e.g. stories260K.gguf says 128.
  const model: ModelDescription =
    flags.context === undefined ? loaded : { ...loaded, config: { ...loaded.config, maxSeqLen: flags.context } }
  const tokenizer = loadTokenizer(model, flags.tokenizer)
  const status = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`edgeshard: ${line}\n`)
  }
  // The master's identity and the workers it admits; local workers get a fresh key each and are admitted.
  // (a refused worker fails the start with a MembershipError naming it: no separate line for the refusal)
  const security = await loadSecurity(flags, 'master')
  if (security.identity.created) status(`created identity key ${security.identity.path}`)
  const transport = { privateKey: security.identity.privateKey, ...(security.membership ? { membership: security.membership } : {}) }

  let workerAddrs = flags.workers?.split(',').map((a) => a.trim()).filter((a) => a.length > 0)
  if (discover) {
    const agents = await findAgents(flags, status, transport)
    workerAddrs = agents.map((a) => a.address)
  }
  const nPeers = workerAddrs ? workerAddrs.length + 1 : (flags.peers ?? 3)
  const names = Array.from({ length: nPeers }, (_, d) => setup.deviceNames?.[d] ?? (d === 0 ? 'master' : `worker-${d}`))
  // Every budget known here: emulate's devices, or --memory-budget on the master and the local workers.
  const budgets = names.map((name, d) => ({
    name,
    budgetBytes: setup.deviceBudgets ? setup.deviceBudgets[d] : d === 0 || workerAddrs === undefined ? flags.memoryBudget : undefined,
  }))
  // What the survey before planning measures: links with --probe-links; for --plan auto without profiles of its own
  // (run, serve) or with measured ones (emulate --profiles measured), every device's published measurement and links.
  const auto = flags.plan === 'auto' && flags.planFile === undefined
  const surveyProfiles = auto && (!setup.autoPlan || setup.measuredProfiles === true)
  const surveyLinks = flags.probeLinks === true || (auto && !setup.autoPlan)
  const autoPlan = (survey?: ClusterSurvey): ClusterPlan => {
    if (setup.autoPlan) return setup.autoPlan(model, nPeers, survey)
    const spec = surveyedClusterSpec('the measured cluster', names, budgets.map((b) => b.budgetBytes), survey!)
    return plannedFor(spec, model, planningOptions(flags))
  }
  // Build and check the plan before any process starts or socket opens (throws RangeError naming the numbers), unless
  // it is planned from what the survey measures.
  const deferred = auto && (surveyProfiles || surveyLinks)
  const resolve = (survey?: ClusterSurvey): ClusterPlan => {
    const plan = resolvePlan(flags, model, nPeers, () => autoPlan(survey), setup.deviceNames)
    checkPlanFits(model, plan, budgets, flags.planFile === undefined ? '' : `plan file ${flags.planFile}: `)
    return plan
  }
  let plan = deferred ? null : resolve()

  const threads = flags.threads ?? Math.max(1, Math.floor(cpus().length / (workerAddrs ? 1 : nPeers)))
  const budget = flags.memoryBudget === undefined ? {} : { memoryBudgetBytes: flags.memoryBudget }
  const progress = createClusterProgress(nPeers, flags.quiet ? { quiet: true } : {})
  let local: LocalWorkers | null = null
  try {
    let addresses: readonly string[] = workerAddrs ?? []
    if (!workerAddrs && nPeers > 1) {
      progress.line(`starting ${nPeers - 1} local worker${nPeers > 2 ? 's' : ''}`)
      const identities = await localWorkerIdentities(security, nPeers - 1)
      try {
        local = await (setup.spawnWorkers?.(nPeers - 1, identities.args) ??
          spawnLocalWorkers(nPeers - 1, { ...budget, ...(flags.pinCores ? { pinCores: true } : {}), agentArgs: identities.args }))
      } finally {
        identities.cleanup()
      }
      addresses = local.addresses
    }
    // A lone master keeps every core for its onnxruntime threads; with local workers each peer gets its own core.
    if (flags.pinCores && local) pinToCore(process.pid, 0)
    if (surveyProfiles || surveyLinks) {
      const survey = await surveyForPlanning(
        addresses,
        { links: surveyLinks, profiles: surveyProfiles, names, transport, ...(setup.links ? { emulated: setup.links } : {}) },
        (line) => progress.line(line),
        (line) => process.stderr.write(`edgeshard: ${line}\n`),
      )
      if (deferred) {
        plan = resolve(survey)
        status(`planned from the measured ${[surveyProfiles ? 'profiles' : '', surveyLinks ? 'links' : ''].filter(Boolean).join(' and ')}`)
      }
    }
    const loadStart = performance.now()
    const cluster = await Cluster.start(model, {
      workers: addresses,
      threads,
      ...(flags.layersPerGraph !== undefined ? { layersPerGraph: flags.layersPerGraph } : {}),
      ...(flags.quantizedMatmul ? { quantizedMatmul: flags.quantizedMatmul } : {}),
      ...(flags.wireDtype ? { wireDtype: flags.wireDtype } : {}),
      ...budget,
      ...(flags.shardDir === undefined ? {} : { shardDir: flags.shardDir }),
      ...(flags.trace ? { trace: true } : {}),
      transport,
      plan: plan!,
      ...(setup.links ? { links: setup.links } : {}),
      onLayerDistributed: (layer, layers) => progress.layerDistributed(layer, layers),
      ...(flags.peerDeadline !== undefined ? { peerDeadlineMs: flags.peerDeadline } : {}),
      recover: flags.recover ?? true,
      ...(flags.recovery ? { recovery: flags.recovery } : {}),
      // A lost local worker is ours: kill it (stalled or not) so nothing is left behind. Remote agents are not ours.
      onWorkerLost: (index) => {
        const child = local?.processes[index - 1]
        if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      },
      // One line, even with --quiet: the run goes on, but the user should know a device dropped out.
      onRecovered: (report) => process.stderr.write(`edgeshard: ${describeRecovery(report)}\n`),
      onWorkerReady: (index, peer) => {
        const pid = local?.processes[index - 1]?.pid
        progress.workerReady(`worker ${index} ready: peer ${peer} at ${addresses[index - 1]}${pid ? ` (pid ${pid})` : ''}`)
      },
    })
    progress.done()
    status(
      `${model.path} on ${nPeers} peer${nPeers > 1 ? 's' : ''} (${describePlan(cluster.clusterPlan)}; ${cluster.wireDtype} on the wire), ` +
        `loaded in ${(performance.now() - loadStart).toFixed(0)} ms`,
    )
    const workers = local
    return {
      model,
      tokenizer,
      cluster,
      peers: nPeers,
      workerAddresses: workerAddrs ?? [],
      transport,
      status,
      async stop() {
        if (flags.trace) {
          try {
            const trace = await cluster.trace()
            writeFileSync(flags.trace, JSON.stringify(trace))
            status(`trace of ${trace.metadata.peers.length} peers (${trace.traceEvents.length} events) written to ${flags.trace}`)
          } catch (err) {
            status(`cannot write the trace to ${flags.trace}: ${(err as Error).message}`)
          }
        }
        await cluster.stop().catch(() => {})
        await workers?.stop()
      },
    }
  } catch (err) {
    progress.done()
    await local?.stop()
    throw err
  }
}

/** Idle agents for `--discover [N]` / `--bootstrap`, most free memory first. @throws DiscoveryError when too few. */
async function findAgents(flags: ClusterFlags, status: (line: string) => void, transport: DiscoverOptions['transport']): Promise<AgentProbe[]> {
  const wanted = typeof flags.discover === 'number' ? flags.discover : undefined
  const timeoutMs = flags.discoverTimeout ?? DEFAULT_DISCOVER_TIMEOUT_MS
  status(`looking for ${wanted ?? 'all'} idle agent${wanted === 1 ? '' : 's'} on the network for up to ${timeoutMs} ms`)
  const agents = await discoverAgents({
    ...(flags.bootstrap ? { bootstrap: flags.bootstrap } : {}),
    ...(wanted !== undefined ? { wanted } : {}),
    timeoutMs,
    ...(transport ? { transport } : {}),
    onFound: (a) => status(`found agent ${a.peer} at ${a.address} (${a.profile.hostname}, ${a.profile.cores} cores${a.profile.busy ? ', busy' : ''})`),
  })
  const idle = agents.filter((a) => !a.profile.busy).sort((a, b) => b.profile.freeMemoryBytes - a.profile.freeMemoryBytes)
  const busy = agents.length - idle.length
  if (idle.length === 0 || (wanted !== undefined && idle.length < wanted)) {
    throw new DiscoveryError(
      `found ${idle.length} idle agent${idle.length === 1 ? '' : 's'}${wanted !== undefined ? ` of ${wanted} wanted` : ''}` +
        `${busy > 0 ? ` (and ${busy} busy)` : ''} within ${timeoutMs} ms; start \`edgeshard agent\` on the other devices, ` +
        'pass --bootstrap ADDR where mDNS does not reach, or --discover-timeout MS',
    )
  }
  return wanted === undefined ? idle : idle.slice(0, wanted)
}
