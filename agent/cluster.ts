import { randomBytes } from 'node:crypto'
import { rm } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { logger } from '@libp2p/logger'
import {
  buildOutputHead,
  type ClusterPlan,
  checkClusterPlan,
  type LayerShardWeights,
  type LinearWeight,
  type ModelDescription,
  ModelWeights,
  nbitsRowF32,
  planTensorParallel,
  sliceLayerShard,
  type StagePlan,
  type TensorParallelOptions,
  type TensorParallelPlan,
  tensorParallelClusterPlan,
} from '../splitter/index.ts'
import {
  type Allreduce,
  f32Body,
  type Frame,
  type FramedChannel,
  type LinkEmulation,
  LinkShaper,
  PeerGoneError,
  PeerStalledError,
  StarAllreduceHub,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
  type TransportNodeOptions,
  WIRE_DTYPES,
  type WireDtype,
} from '../transport/index.ts'
import { PeerFailedError } from './errors.ts'
import { checkDistinctWorkers } from './membership.ts'
import { masterCapabilities, probeWorkerProfiles, type ReplanChoice, replanOver, type WorkerProfile } from './replan.ts'
import { defaultShardDir, encodeLayerShard, kvCacheBytes, ownedLayerShard } from './shard-encoding.ts'
import { Session } from './runtime.ts'
import { asConstants, type ForwardTimings, linearFeeds, ShardRunner } from './shard-runner.ts'
import { LOCAL_ALLREDUCE } from './stage-worker.ts'
import { MemoryBudgetError, openShard, ShardFileWriter, type WeightStore } from './weight-store.ts'
import { memoryUsage } from './memory.ts'
import { localAllreduceGroup } from './local-group.ts'
import { DEFAULT_HEARTBEAT_MS, DEFAULT_PEER_DEADLINE_MS, stepDeadlineMs } from './peer-deadline.ts'
import type { EmulatedLink, StageRole, WorkerStats, WorkerTraceHeader } from './protocol.ts'
import { type ChromeTrace, clockOffsetMs, mergeTraces, type PeerTrace, type RecordedSpan, TraceRecorder, traceReceive, tracedLink, type Tracer, wallClockMs } from './trace.ts'

const log = logger('edgeshard:agent:cluster')

/** How long {@link Cluster.admit} waits for a worker's connection by default, ms. */
const DEFAULT_DIAL_TIMEOUT_MS = 2000

/** How long the master waits for the workers' device profiles at start, ms (they answer in a round trip or two). */
const PROFILE_TIMEOUT_MS = 2000
/** How long `stop()` waits for a worker to close its half of the session after `bye`, ms. */
const BYE_TIMEOUT_MS = 2000

/** Errors that name a worker that went away, stalled or failed: a forward failing with one of them can recover. */
const LOSS_ERRORS: ReadonlySet<string> = new Set(['PeerGoneError', 'PeerStalledError', 'PeerFailedError'])

/**
 * A worker the master drives: its channel, where it was reached, and its part in the current plan (re-planning
 * changes the part; the channel stays).
 */
interface WorkerLink {
  /** Device index (workers are devices 1..N-1 in the order given). */
  readonly index: number
  readonly address: string
  readonly channel: FramedChannel
  /** Index of its stage in the plan. */
  stage: number
  /** Its shard in the stage's tensor-parallel plan. */
  shardIndex: number
  role: StageRole
  /** Its seat in the master's allreduce hub, or -1 (not in the master's stage). */
  hubIndex: number
  /** Set once the master gave up on it (went away, stalled, failed); it then takes no part in anything. */
  lost: Error | null
  /** When it was declared lost (performance.now and Unix ms). */
  lostAt: number
  lostAtWallMs: number
  /** The last epoch whose `aborted` it sent: frames from it before that are about aborted passes. */
  epoch: number
  /** When bytes last arrived from it (performance.now ms) and how many had arrived then. */
  heardAt: number
  heardBytes: number
  /** What it last reported in an `error` frame about itself. */
  report: { readonly message: string; readonly errorName: string | undefined } | null
}

/** One stage as the master executes it: on the master (it is the hub) or behind a leader. */
type StageExecution =
  | { readonly kind: 'local'; readonly plan: StagePlan; readonly members: readonly WorkerLink[] }
  | { readonly kind: 'remote'; readonly plan: StagePlan; readonly leader: WorkerLink }

/** Options of {@link Cluster.start}. */
export interface ClusterOptions {
  /** Multiaddrs of running worker agents: devices 1..N-1 of the plan (shards 1..N-1 of a tensor-parallel plan). */
  readonly workers: readonly string[]
  /** ORT intra-op threads on the master and each worker. */
  readonly threads: number
  /**
   * Decoder layers per graph on a peer that is alone in its stage (see ShardRunnerOptions.layersPerGraph), on the
   * master and each worker; 0 keeps one graph per attention and FFN block. Default: the runner's.
   */
  readonly layersPerGraph?: number
  readonly signal?: AbortSignal
  /** Called as each worker finishes loading its shard (`index`: its device index). */
  readonly onWorkerReady?: (index: number, peer: string) => void
  /**
   * Bytes the master may use for its own share's weights and KV cache; when the share is larger it streams from a
   * shard file on disk through a sliding window (TPI-LLM §3.3). Default: all resident.
   */
  readonly memoryBudgetBytes?: number
  /** Where the master writes its shard file in sliding-window mode (default: a folder under the OS temp dir). */
  readonly shardDir?: string
  /** Activations of Q4_0/Q8_0 matmuls: 'exact' f32 (default) or 'int8' blocks (llama.cpp's arithmetic, faster). */
  readonly quantizedMatmul?: 'exact' | 'int8'
  /**
   * Element type of the allreduce partials and sums on the wire, for every hub and member of every stage: 'f32'
   * (default, exact) or 'f16' (half the bytes; each crossing rounds to binary16, see transport/allreduce.ts).
   * Hidden states between stages stay f32.
   */
  readonly wireDtype?: WireDtype
  /** Called after each layer has been sliced and sent to every peer (for progress bars). */
  readonly onLayerDistributed?: (layer: number, layers: number) => void
  /** Record trace spans on every peer (see trace.ts and {@link Cluster.trace}). Default false. */
  readonly trace?: boolean
  /**
   * The master's libp2p identity and the workers it admits (trust set, pre-shared key); see TransportNodeOptions.
   * Default: a fresh key, any worker admitted.
   */
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
  /**
   * The cluster plan: stages of devices (0 = the master, i = `workers[i-1]`) over layer ranges. Checked against the
   * model and the devices (RangeError). Default: tensor parallelism over the master and every worker, even shares.
   */
  readonly plan?: ClusterPlan
  /**
   * Link emulation (`edgeshard emulate`): the link from device `from` to device `to`, or undefined for a plain one.
   * Each side shapes what it sends, from the moment the weights are loaded.
   */
  readonly links?: (from: number, to: number) => LinkEmulation | undefined
  /**
   * Survive a lost worker (see {@link Cluster.forward}): re-plan over the survivors, re-send shards, rebuild the KV
   * cache and carry on. Default true; false fails the cluster on the first loss (PeerFailedError naming the peer).
   */
  readonly recover?: boolean
  /**
   * Base deadline for a worker's allreduce partial and for its silence, ms, scaled per pass by its positions (see
   * peer-deadline.ts). Default 2000.
   */
  readonly peerDeadlineMs?: number
  /**
   * How a lost worker is replaced. `adopt` (default where possible): the master takes over the lost worker's shard,
   * read from its model file (no weights cross the network; survivors keep theirs) — possible while the plan is
   * tensor parallelism over the master and the master holds its share in memory (no `memoryBudgetBytes`); otherwise
   * `even`: a new plan over the master and the survivors, every shard sent again — the planner's (splitter/cluster-plan.ts)
   * when every one of them published a measured profile, else an even tensor-parallel split (see replan.ts).
   */
  readonly recovery?: 'adopt' | 'even'
  /** Called when a worker is declared lost, before anything else happens (e.g. to kill a local worker process). */
  readonly onWorkerLost?: (device: number, peer: string, reason: Error) => void
  /** Called once a recovery has completed: the failed pass's logits are ready. */
  readonly onRecovered?: (report: RecoveryReport) => void
}

/** A worker the master gave up on (part of a {@link RecoveryReport}). */
export interface LostWorker {
  /** Its device index. */
  readonly device: number
  readonly peer: string
  readonly address: string
  /** `stalled`: silent past its deadline; `gone`: its stream ended or it reported a failure of its own. */
  readonly kind: 'gone' | 'stalled'
  /** Why, one line. */
  readonly reason: string
  /** The failure it reported of its own before it went (e.g. a shard block that failed its checksum), if any. */
  readonly report?: string
  /** How long nothing had arrived from it when it was declared lost, ms. */
  readonly silentMs: number
  /** When it was declared lost, Unix ms. */
  readonly detectedAtMs: number
}

/** What one recovery did and how long each phase took (ms). */
export interface RecoveryReport {
  readonly lost: readonly LostWorker[]
  /**
   * `adopt`: the master took over the lost shards; `even`: a new plan over the master and the survivors, every shard
   * sent again (made as `replan` says).
   */
  readonly strategy: 'adopt' | 'even'
  /** `even`: who made the new plan (the planner on measured profiles, or the even split) and what or why, one line. */
  readonly replan?: { readonly by: ReplanChoice['by']; readonly why: string }
  /** Shards of the plan the master runs now (its own first). */
  readonly masterShards: readonly number[]
  /** Peers left, the master included. */
  readonly peers: number
  /** Positions whose KV cache was rebuilt (the sequence before the failed pass). */
  readonly positions: number
  /** From the failed pass's start to the loss being known (0 when it was known before the pass). */
  readonly detectMs: number
  /** Survivors dropping their passes in flight (`abort` until every `aborted`). */
  readonly abortMs: number
  /** Building the new plan (`even`). */
  readonly replanMs: number
  /** `even`: sending the new shards and loading them on every peer; `adopt`: the master loading the lost shards. */
  readonly reshardMs: number
  /** Re-running the sequence so far plus the failed pass on the new plan. */
  readonly rebuildMs: number
  /** detect + abort + re-plan + re-shard + rebuild: from the failed pass's start to its logits. */
  readonly totalMs: number
  /** Recovery attempts (more than 1 when another worker was lost while recovering). */
  readonly attempts: number
}

/** What {@link Cluster.admit} did. */
export interface AdmitReport {
  /** Workers that joined, by device index (an address the cluster had before keeps its index). */
  readonly admitted: readonly { readonly device: number; readonly peer: string; readonly address: string }[]
  /** Addresses that could not be dialled, or were refused (the peer is in the cluster already), and why. */
  readonly unreachable: readonly { readonly address: string; readonly reason: string }[]
  /** Workers found lost since the last pass and left out of the new plan, by device index. */
  readonly dropped: readonly number[]
  /** Peers in the plan now, the master included. */
  readonly peers: number
  /**
   * The plan now running: `initial` (every device of the plan the cluster started with is back, and no other), else
   * a re-plan as after a loss (see replan.ts); `why` in one line. Absent when nobody joined (nothing changed).
   */
  readonly plan?: { readonly by: 'initial' | ReplanChoice['by']; readonly why: string }
  /** Dialling, re-planning and installing the plan on every peer, ms. */
  readonly totalMs: number
}

/** Wire and time counters since the cluster started, for the run summary. */
export interface ClusterCounters {
  allreduces: number
  timings: ForwardTimings
  /** Time the master waited for stages it does not run (pipeline hand-offs plus their compute), ms. */
  stageWaitMs: number
  /** Time in the output head (final RMSNorm and classifier, onnxruntime), ms. */
  headMs: number
}

/** Replies the master awaits from a worker, one at a time per type. */
type ReplyType = 'stats' | 'trace' | 'stage-out' | 'ready' | 'stage-ready' | 'aborted'

/**
 * The master's view of a cluster: it owns the model file and the plan, sends each worker its stage's plan and its
 * shard of that stage's layers, keeps the embedding, final norm and classifier (plus its own shard when it is in a
 * stage), and drives forward passes: stage by stage in layer order, with a star allreduce inside each stage (itself
 * the hub of its own stage, a leader the hub of the others; see stage-worker.ts). Raw text and token ids never leave
 * this object: workers receive hidden states only.
 *
 * Failure and recovery: every worker sends a heartbeat when it has nothing else to send, and the master
 * declares a worker lost when its stream ends, it reports a failure, its allreduce partial misses the round's
 * deadline, or nothing arrives from it for the deadline (see peer-deadline.ts for the rule). A pass that fails
 * because of a lost worker is recovered unless `recover: false`: the survivors drop what is in flight (`abort`), the
 * master re-plans over itself and the survivors (the planner on measured profiles, else even tensor-parallel shares; or
 * it takes the lost shards over itself, `recovery: 'adopt'`), sends the new shards on the same
 * streams, and re-runs the sequence so far plus the failed pass, so the caller gets the logits it asked for.
 */
export class Cluster {
  readonly model: ModelDescription
  readonly counters: ClusterCounters = { allreduces: 0, timings: { computeMs: 0, allreduceMs: 0, ioWaitMs: 0 }, stageWaitMs: 0, headMs: 0 }
  /** Every recovery so far, in order. */
  readonly recoveries: RecoveryReport[] = []
  readonly #options: ClusterOptions
  readonly #recover: boolean
  readonly #strategy: 'adopt' | 'even'
  readonly #deadlineMs: number
  readonly #wireDtype: WireDtype
  #node: TransportNode | null
  /** Address of every worker the cluster has had, by device index − 1 (`options.workers`, then admitted ones). */
  readonly #addresses: string[]
  /** The plan the cluster started with: installed again when exactly its devices are back (see {@link admit}). */
  readonly #initialPlan: ClusterPlan
  /** Measured profiles and round trips of the workers (info protocol), by device index, for re-planning. */
  readonly #profiles = new Map<number, WorkerProfile>()
  /** Workers in the cluster (a lost one stays until the next recovery handles it). */
  #links: WorkerLink[]
  /** Workers lost and handled (kept for the wire byte count). */
  readonly #gone: WorkerLink[] = []
  #clusterPlan: ClusterPlan
  #plan: TensorParallelPlan
  #stages: readonly StageExecution[] = []
  #hub: StarAllreduceHub | null = null
  #runner: ShardRunner | null = null
  /** Shards of lost workers the master took over (`adopt`), by shard index, in order. */
  #adopted: { readonly shardIndex: number; readonly runner: ShardRunner }[] = []
  readonly #head: Session
  readonly #embedding: LinearWeight // [vocab, dim], dense or quantized
  readonly #source: ModelWeights
  readonly #shapers: Map<string, LinkShaper>
  #step = 0
  #position = 0
  /** Tokens fed since the last reset, in order: the prefix a recovery re-runs to rebuild the KV cache. */
  #history: number[] = []
  /** Incremented by every recovery; a worker's frames count once it acknowledged the current one. */
  #epoch = 0
  #failure: Error | null = null
  #closing = false
  /** The pass in flight (its positions set the silence deadline), else null. */
  #inFlight: { readonly seq: number; readonly end: number } | null = null
  #watchdog: ReturnType<typeof setInterval> | undefined
  #lastTick = 0
  /**
   * Replies awaited, by `device:type`; a worker's are rejected when it is lost, all are when the cluster fails.
   */
  readonly #replies = new Map<string, { resolve: (frame: Frame) => void; reject: (err: Error) => void }>()
  readonly #tracer: TraceRecorder | undefined
  #overheadBytes = 0
  /** Default shard directories written by this master, removed at stop. */
  readonly #ownShardDirs = new Set<string>()

  private constructor(
    model: ModelDescription,
    options: ClusterOptions,
    clusterPlan: ClusterPlan,
    node: TransportNode | null,
    links: WorkerLink[],
    head: Session,
    source: ModelWeights,
    tracer: TraceRecorder | undefined,
    shapers: Map<string, LinkShaper>,
  ) {
    this.model = model
    this.#options = options
    this.#recover = options.recover ?? true
    this.#strategy = options.recovery ?? 'adopt'
    this.#deadlineMs = options.peerDeadlineMs ?? DEFAULT_PEER_DEADLINE_MS
    this.#wireDtype = options.wireDtype ?? 'f32'
    this.#clusterPlan = clusterPlan
    this.#addresses = [...options.workers]
    this.#initialPlan = clusterPlan
    this.#plan = masterPlanOf(clusterPlan)
    this.#node = node
    this.#links = links
    this.#head = head
    this.#source = source
    this.#embedding = source.linear('token_embd.weight')
    this.#tracer = tracer
    this.#shapers = shapers
  }

  /**
   * Plans the model over the master plus `options.workers` (or checks `options.plan`), dials every worker the plan
   * uses, sends plans and shards, loads the master's own shard, and connects the stages without the master.
   * @throws RangeError from the planner or the plan check, TypeError for an unknown `wireDtype` (both before any
   *   socket opens); DialError naming an unreachable
   *   worker; PeerFailedError when a worker refuses its shard or a leader cannot reach its members; MemoryBudgetError
   *   when a worker's budget cannot hold its share.
   */
  static async start(model: ModelDescription, options: ClusterOptions): Promise<Cluster> {
    const nDevices = options.workers.length + 1
    const clusterPlan = options.plan
      ? checkClusterPlan(options.plan, model.config, nDevices)
      : tensorParallelClusterPlan(model.config, nDevices, { ...planConstraints(model), quantizedMatmul: options.quantizedMatmul ?? 'exact' })
    if (options.peerDeadlineMs !== undefined && !(Number.isFinite(options.peerDeadlineMs) && options.peerDeadlineMs > 0)) {
      throw new RangeError(`peer deadline must be a positive number of ms, got ${options.peerDeadlineMs}`)
    }
    if (options.wireDtype !== undefined && !WIRE_DTYPES.includes(options.wireDtype)) {
      throw new TypeError(`invalid wire dtype ${JSON.stringify(options.wireDtype)}: expected ${WIRE_DTYPES.join(' or ')}`)
    }
    const source = new ModelWeights(model)
    let node: TransportNode | null = null
    const links: WorkerLink[] = []
    const tracer = options.trace ? new TraceRecorder() : undefined
    const shapers = new Map<string, LinkShaper>()
    let profiles = new Map<number, WorkerProfile>()
    let head: Session | null = null
    let cluster: Cluster | null = null
    try {
      const used = clusterPlan.stages.flatMap((stage, s) =>
        stage.devices.map((device, shardIndex) => ({ device, stage: s, shardIndex, role: stageRole(stage, shardIndex) })),
      )
      const dialed = used.filter((u) => u.device > 0).sort((a, b) => a.device - b.device)
      if (dialed.length > 0) {
        node = new TransportNode({ listen: [], linkShaper: (peer) => shapers.get(peer), ...options.transport })
        await node.start()
        for (const u of dialed) {
          const address = options.workers[u.device - 1]!
          // A fresh connection per address: libp2p would reuse the first agent's for a second one with the same peer id.
          const channel = await node.dial(address, TENSOR_PARALLEL_PROTOCOL, { ...(options.signal ? { signal: options.signal } : {}), fresh: true })
          links.push({ ...workerLink(u.device, address, channel, 0), stage: u.stage, shardIndex: u.shardIndex, role: u.role })
        }
        // Before any plan or weight leaves: refuse two agents answering as one peer id (a copied identity key).
        await checkDistinctWorkers(node, links.map((l) => ({ index: l.index, address: l.address, peer: l.channel.remotePeer })), options.signal ? { signal: options.signal } : {})
        // Their measured profiles, for a re-plan when one is lost: asked before they load a shard (free memory), and
        // before the head session is built (that blocks this thread for long enough to time the answers out).
        profiles = await probeWorkerProfiles(node, links.map((l) => ({ device: l.index, address: l.address })), {
          timeoutMs: PROFILE_TIMEOUT_MS,
          ...(options.signal ? { signal: options.signal } : {}),
        })
      }
      // The classifier is baked into the head graph as an initializer (pre-packed by ORT; fast for MatMulNBits).
      const classifier = source.linear('output.weight')
      head = await Session.create(
        'output_head',
        buildOutputHead(
          {
            dim: model.config.dim,
            vocabSize: model.config.vocabSize,
            normEps: model.config.normEps,
            bits: classifier.bits,
            quantizedMatmul: masterPlanOf(clusterPlan).quantizedMatmul,
          },
          asConstants({
            output_norm: { data: source.vector('output_norm.weight'), dims: [model.config.dim] },
            ...linearFeeds('wcls', classifier),
          }),
        ),
        { threads: options.threads },
      )
      cluster = new Cluster(model, options, clusterPlan, node, links, head, source, tracer, shapers)
      for (const [device, profile] of profiles) cluster.#profiles.set(device, profile)
      source.clear()
      for (const link of links) void cluster.#route(link)
      cluster.#startWatchdog() // a worker that stalls while loading must not hang the start
      try {
        await cluster.#install(clusterPlan, true)
      } catch (err) {
        // A worker that went away or stalled while loading is replaced as during generation; one that refused its
        // shard (a report of its own, e.g. over its memory budget) fails the start.
        if (!cluster.#recover || cluster.#live().length === cluster.#links.length || cluster.#links.some((l) => l.lost && l.report)) throw err
        const started = performance.now()
        const phases = await cluster.#recoverLost()
        cluster.#recovered({ ...phases, detectMs: 0, rebuildMs: 0, totalMs: performance.now() - started })
      }
      return cluster
    } catch (err) {
      if (cluster) {
        cluster.#closing = true
        clearInterval(cluster.#watchdog)
        await cluster.#runner?.release().catch(() => {})
        await cluster.#removeShardFiles()
      }
      for (const link of links) link.channel.abort(err as Error)
      await node?.stop()
      await head?.release().catch(() => {})
      throw err
    }
  }

  /**
   * Sends every worker its part of `clusterPlan` and its shard, layer by layer, on the open streams; loads the master's
   * own shard; waits for every worker to be ready; connects the stages without the master; builds the master's hub.
   * Runs at start and again after a worker is lost (workers accept a new `plan` on the same stream).
   * @param first - the start (progress callbacks and emulated link shaping apply)
   * @throws PeerFailedError or MemoryBudgetError naming a worker that refused its shard; whatever a lost worker's
   *   stream ended with
   */
  async #install(clusterPlan: ClusterPlan, first: boolean): Promise<void> {
    const options = this.#options
    const model = this.model
    const source = this.#source
    const masterStageIndex = clusterPlan.stages.findIndex((s) => s.devices.includes(0))
    const masterPlan = clusterPlan.stages[masterStageIndex]?.tensorParallel
    // The old shards go first: their memory is needed for the new one.
    await this.#runner?.release()
    this.#runner = null
    for (const a of this.#adopted) await a.runner.release()
    this.#adopted = []
    this.#hub = null
    this.#stages = []
    const links = this.#links.filter((l) => !l.lost)
    for (const l of links) {
      const s = clusterPlan.stages.findIndex((stage) => stage.devices.includes(l.index))
      if (s < 0) throw new RangeError(`cannot install a plan without device ${l.index}: every connected worker needs a part`)
      l.stage = s
      l.shardIndex = clusterPlan.stages[s]!.devices.indexOf(l.index)
      l.role = stageRole(clusterPlan.stages[s]!, l.shardIndex)
      l.hubIndex = s === masterStageIndex ? l.shardIndex - 1 : -1
    }
    const peerOf = (device: number): string => (device === 0 ? this.#node!.peerId : links.find((l) => l.index === device)!.channel.remotePeer)
    const emulated = (from: number): EmulatedLink[] =>
      [0, ...links.map((l) => l.index)].flatMap((to) => {
        const link = to === from ? undefined : options.links?.(from, to)
        return link ? [{ peer: peerOf(to), rttMs: link.rttMs, bitsPerSecond: link.bitsPerSecond }] : []
      })
    const stageIds = clusterPlan.stages.map(() => randomBytes(8).toString('hex'))
    const heartbeatMs = Math.max(10, Math.round(Math.min(DEFAULT_HEARTBEAT_MS, this.#deadlineMs / 4)))
    const t0 = performance.now()
    // Every send below settles before anything is thrown: a retry must not find old frames still leaving.
    const refused = (link: WorkerLink) => (err: unknown) => {
      throw refusal(link, 'refused its shard', err)
    }
    await settleAll(
      links.map((l) => {
        const emulatedLinks = emulated(l.index)
        return l.channel.send({
          type: 'plan',
          plan: clusterPlan.stages[l.stage]!.tensorParallel,
          shardIndex: l.shardIndex,
          threads: options.threads,
          ...(options.layersPerGraph !== undefined ? { layersPerGraph: options.layersPerGraph } : {}),
          ...(this.#tracer ? { trace: true } : {}),
          ...(l.role !== 'member' ? { role: l.role, stageId: stageIds[l.stage]! } : {}),
          ...(emulatedLinks.length > 0 ? { links: emulatedLinks } : {}),
          heartbeatMs,
          peerDeadlineMs: Math.max(1, Math.round(this.#deadlineMs)),
          wireDtype: this.#wireDtype,
        }).catch(refused(l))
      }),
    )
    // Layer by layer: read the layer's tensors once, cut every peer's share, send it, forget the layer. Neither
    // the whole model nor a whole shard needs to be in memory at once.
    const budget = options.memoryBudgetBytes
    const shardDir = options.shardDir ?? defaultShardDir('master')
    let writer: ShardFileWriter | null = null
    try {
      if (budget !== undefined && masterPlan) {
        writer = await ShardFileWriter.create(shardDir)
        if (options.shardDir === undefined) this.#ownShardDirs.add(shardDir)
      }
      const own: LayerShardWeights[] = Array.from({ length: model.config.nLayers }, () => ({ attention: null, ffn: null }))
      const sent = links.map(() => 0)
      const inStage = (plan: TensorParallelPlan, layer: number): boolean => layer >= plan.layers.start && layer < plan.layers.start + plan.layers.count
      for (let layer = 0; layer < model.config.nLayers; layer++) {
        await settleAll(
          links.map(async (link, i) => {
            const plan = clusterPlan.stages[link.stage]!.tensorParallel
            if (!inStage(plan, layer)) return
            for (const t of encodeLayerShard(sliceLayerShard(plan.model, plan.shards[link.shardIndex]!, layer, source))) {
              await link.channel.send({ type: 'tensor', layer, name: t.name, bits: t.bits, rows: t.rows, cols: t.cols }, t.body).catch(refused(link))
              sent[i]! += 1
            }
          }),
        )
        if (masterPlan && inStage(masterPlan, layer)) {
          const mine = sliceLayerShard(masterPlan.model, masterPlan.shards[0]!, layer, source)
          if (writer) {
            for (const t of encodeLayerShard(mine)) await writer.add(layer, t.name, t.bits, t.rows, t.cols, t.body)
          } else {
            own[layer] = ownedLayerShard(mine)
          }
        }
        source.clearLayer(layer)
        if (first) options.onLayerDistributed?.(layer, model.config.nLayers)
      }
      log('install: shards sliced and sent in %d ms', Math.round(performance.now() - t0))
      const ready = links.map((l) => this.#expect(l, 'ready'))
      for (const r of ready) r.catch(() => {}) // awaited below
      await settleAll(links.map((l, i) => l.channel.send({ type: 'load-done', tensors: sent[i]! }).catch(refused(l))))
      if (masterPlan) {
        let store: WeightStore | LayerShardWeights[] = own
        if (writer) {
          const total = await writer.finish()
          writer = null
          store = await openShard(shardDir, { budgetBytes: budget!, kvCacheBytes: kvCacheBytes(masterPlan, 0), quantizedMatmul: masterPlan.quantizedMatmul })
          log('master shard: %d bytes on disk', total)
        }
        this.#runner = await ShardRunner.create(masterPlan, 0, store, {
          threads: options.threads,
          ...(budget !== undefined ? { lowMemory: true } : {}),
          ...(options.layersPerGraph !== undefined ? { layersPerGraph: options.layersPerGraph } : {}),
        })
      }
      log('install: master shard loaded at %d ms', Math.round(performance.now() - t0))
      if (first) this.#overheadBytes = memoryUsage().rssBytes
      await settleAll(
        links.map(async (link, i) => {
          await ready[i]!.catch(refused(link))
          if (first) options.onWorkerReady?.(link.index, link.channel.remotePeer)
        }),
      )
    } finally {
      await writer?.finish().catch(() => {})
    }
    log('install: every worker ready at %d ms', Math.round(performance.now() - t0))
    // Emulated links apply to the master's sends from here on, as they do on the workers.
    for (const l of links) {
      const link = options.links?.(0, l.index)
      if (link && !this.#shapers.has(l.channel.remotePeer)) this.#shapers.set(l.channel.remotePeer, new LinkShaper(link))
    }
    // Stages without the master: each leader dials its members.
    const stages: StageExecution[] = clusterPlan.stages.map((plan, s) => {
      if (s === masterStageIndex) {
        return { kind: 'local', plan, members: plan.devices.slice(1).map((d) => links.find((l) => l.index === d)!) }
      }
      return { kind: 'remote', plan, leader: links.find((l) => l.index === plan.devices[0])! }
    })
    await settleAll(
      stages.map(async (stage) => {
        if (stage.kind !== 'remote') return
        const members = stage.plan.devices.slice(1).map((d) => ({ address: links.find((l) => l.index === d)!.address, shardIndex: stage.plan.devices.indexOf(d) }))
        const reply = this.#expect(stage.leader, 'stage-ready')
        reply.catch(() => {})
        await stage.leader.channel.send({ type: 'stage', members })
        await reply.catch((err: unknown) => {
          throw refusal(stage.leader, 'cannot lead its stage', err)
        })
      }),
    )
    const local = stages.find((s) => s.kind === 'local')
    const tracer = this.#tracer
    this.#hub =
      local && local.members.length > 0
        ? new StarAllreduceHub(local.members.map((l) => (tracer ? tracedLink(l.channel, tracer) : l.channel)), { deadlineMs: this.#deadlineMs, wireDtype: this.#wireDtype })
        : null
    this.#stages = stages
    this.#clusterPlan = clusterPlan
    this.#plan = masterPlanOf(clusterPlan)
  }

  /** Devices in the plan, the master included (it always holds the embedding and the classifier). */
  get size(): number {
    return this.#live().length + 1
  }

  /** The master's stage's tensor-parallel plan (the whole model for pure tensor parallelism), else the first stage's. */
  get plan(): TensorParallelPlan {
    return this.#plan
  }

  /** Every stage, its devices and layers (after a recovery: tensor parallelism over the master and the survivors). */
  get clusterPlan(): ClusterPlan {
    return this.#clusterPlan
  }

  /** The master's tracer when started with `trace: true` (for spans such as tokens), else undefined. */
  get tracer(): Tracer | undefined {
    return this.#tracer
  }

  /** Element type of the allreduce tensors on the wire (`ClusterOptions.wireDtype`). */
  get wireDtype(): WireDtype {
    return this.#wireDtype
  }

  /** Positions in the KV cache. */
  get position(): number {
    return this.#position
  }

  /** The workers in the plan now (not lost): device index, the address they were dialled at, and peer id. */
  get workers(): { readonly device: number; readonly address: string; readonly peer: string }[] {
    return this.#live().map((l) => ({ device: l.index, address: l.address, peer: l.channel.remotePeer }))
  }

  /**
   * Admits workers between generations (a peer that comes back, or a new one, is used from the next request
   * on). Dials each of `addresses` that is not a live worker's on a fresh connection (a worker lost earlier and
   * restarted, or a new agent); when any answers, re-plans over the master, the live workers and the new ones and
   * installs the plan on all of them (every shard sent again): the plan the cluster started with when exactly its
   * devices are back, otherwise a re-plan as after a loss (the planner on measured profiles, else the even split). An
   * address the cluster had before keeps its device index; a new one gets the next. Workers lost since the last pass
   * are left out. Call it between generations, never during one: the KV caches are empty afterwards (as after
   * {@link reset}). A worker that fails while the plan is installed is handled as a loss (recovered, unless
   * `recover: false`).
   * @returns who joined and which addresses did not answer (not an error; nothing changes when nobody joins)
   * @throws the cluster's failure when it has failed; what the installation throws when it cannot recover
   */
  async admit(addresses: readonly string[], options: { signal?: AbortSignal; dialTimeoutMs?: number } = {}): Promise<AdmitReport> {
    this.#throwIfFailed()
    if (this.#inFlight) throw new RangeError('cannot admit workers during a forward pass')
    const started = performance.now()
    const unreachable: { address: string; reason: string }[] = []
    const unchanged = (): AdmitReport => ({ admitted: [], unreachable, dropped: [], peers: this.size, totalMs: performance.now() - started })
    const wanted = [...new Set(addresses)].filter((a) => !this.#live().some((l) => l.address === a))
    if (wanted.length === 0) return unchanged()
    const node = await this.#ensureNode()
    const timeout = AbortSignal.timeout(options.dialTimeoutMs ?? DEFAULT_DIAL_TIMEOUT_MS)
    const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout
    const dialled = await Promise.all(
      wanted.map((address) =>
        node.dial(address, TENSOR_PARALLEL_PROTOCOL, { signal, fresh: true }).then(
          (channel) => ({ address, channel }),
          (err: unknown) => {
            unreachable.push({ address, reason: (err as Error).message })
            return null
          },
        ),
      ),
    )
    const fresh: { address: string; channel: FramedChannel }[] = []
    for (const d of dialled) {
      if (!d) continue
      const peer = d.channel.remotePeer
      const same = [...this.#live().map((l) => ({ address: l.address, peer: l.channel.remotePeer })), ...fresh.map((f) => ({ address: f.address, peer: f.channel.remotePeer }))].find(
        (x) => x.peer === peer,
      )
      if (same) {
        await d.channel.close().catch(() => {})
        unreachable.push({ address: d.address, reason: `peer ${peer} is in the cluster already, at ${same.address}` })
        continue
      }
      fresh.push(d)
    }
    if (fresh.length === 0) return unchanged()
    // Workers lost since the last pass take no part: the new plan stands in for the recovery they would have had.
    const dropped = this.#links.filter((l) => l.lost)
    this.#gone.push(...dropped)
    this.#links = this.#live()
    this.#hub = null
    for (const waiting of this.#replies.values()) waiting.reject(new Error('superseded by a new plan'))
    this.#replies.clear()
    const epoch = ++this.#epoch
    const survivors = this.#links
    const joined = fresh.map(({ address, channel }) => {
      if (!this.#addresses.includes(address)) this.#addresses.push(address)
      this.#profiles.delete(this.#addresses.indexOf(address) + 1)
      return workerLink(this.#addresses.indexOf(address) + 1, address, channel, epoch)
    })
    this.#links = [...survivors, ...joined]
    for (const l of joined) void this.#route(l)
    if (this.#watchdog === undefined) this.#startWatchdog()
    log('admitting %d workers (%s) beside %d', joined.length, joined.map((l) => l.index).join(', '), survivors.length)
    let plan: AdmitReport['plan']
    try {
      const [profiles] = await Promise.all([
        probeWorkerProfiles(node, joined.map((l) => ({ device: l.index, address: l.address })), { timeoutMs: PROFILE_TIMEOUT_MS }),
        // The survivors drop their shards (and stage roles) for the new plan.
        settleAll(
          survivors.map(async (l) => {
            const acked = this.#expect(l, 'aborted')
            acked.catch(() => {})
            await this.#send(l, { type: 'abort', epoch, step: this.#step })
            await acked
          }),
        ),
      ])
      for (const [device, profile] of profiles) this.#profiles.set(device, profile)
      const devices = this.#links.map((l) => l.index)
      const initial = new Set(this.#initialPlan.stages.flatMap((s) => s.devices).filter((d) => d > 0))
      let next: ClusterPlan
      if (initial.size === devices.length && devices.every((d) => initial.has(d))) {
        next = this.#initialPlan
        plan = { by: 'initial', why: 'every device of the starting plan is back' }
      } else {
        const choice = this.#replan(devices)
        next = { ...choice.plan, excluded: this.#absent(choice.plan).map((device) => ({ device, reason: 'not in the cluster' })) }
        plan = { by: choice.by, why: choice.why }
      }
      this.#stages = []
      this.#position = 0
      this.#history = []
      await this.#install(next, false)
      if (this.#live().length < this.#links.length) throw new Error('a worker was lost while the new plan was installed')
    } catch (err) {
      // A newcomer that refused its shard (a report of its own, e.g. its memory budget) is let go like a lost worker;
      // anything lost meanwhile is recovered as during generation.
      for (const l of joined) if (l.report && !l.lost) this.#lose(l, err as Error)
      if (!this.#recover || this.#closing || this.#live().length === this.#links.length) {
        this.#failure ??= err as Error
        throw err
      }
      const t = performance.now()
      const phases = await this.#recoverLost()
      this.#recovered({ ...phases, detectMs: 0, rebuildMs: 0, totalMs: performance.now() - t })
      plan = phases.replan ?? { by: 'even', why: 'recovered from a loss while admitting' }
    }
    const admitted = joined.filter((l) => !l.lost).map((l) => ({ device: l.index, peer: l.channel.remotePeer, address: l.address }))
    const report: AdmitReport = { admitted, unreachable, dropped: dropped.map((l) => l.index), peers: this.size, plan, totalMs: performance.now() - started }
    log('admitted: %o', report)
    return report
  }

  /** The libp2p node, started now if the cluster began without workers. */
  async #ensureNode(): Promise<TransportNode> {
    if (!this.#node) {
      const node = new TransportNode({ listen: [], linkShaper: (peer) => this.#shapers.get(peer), ...this.#options.transport })
      await node.start()
      this.#node = node
    }
    return this.#node
  }

  /** Starts a new sequence on every peer (leaders relay it to their members). */
  async reset(): Promise<void> {
    this.#throwIfFailed()
    this.#runner?.reset()
    for (const a of this.#adopted) a.runner.reset()
    this.#position = 0
    this.#history = []
    await Promise.all(
      this.#live()
        .filter((l) => l.role !== 'stage-member')
        .map((l) =>
          this.#send(l, { type: 'reset' }).catch((err: unknown) => {
            // A worker lost now is replaced at the next pass (its KV cache is empty anyway).
            if (!this.#recover || !l.lost) throw this.#failure ?? err
          }),
        ),
    )
  }

  /**
   * Feeds `tokens` at positions position..position+n-1 through every layer: stage by stage in layer order, the
   * master's own stage with the master as allreduce hub, every other stage behind its leader (`forward` out,
   * `stage-out` back).
   *
   * When a worker is lost before or during the pass (its stream ends, it reports a failure, or it stays silent past
   * the deadline) and recovery is on, the pass is recovered: survivors abort what is in flight, the master re-plans
   * over itself and the survivors (see `recovery`; the master alone when none is left), re-sends the
   * shards, and runs the sequence since the last `reset` plus `tokens` again, so the caller gets the same logits.
   * Several losses (one after another or at once) are recovered the same way.
   * @param allLogits return logits for every fed position instead of only the last.
   * @returns logits [n or 1, vocab] f32.
   * @throws PeerFailedError (or PeerGoneError, PeerStalledError) naming the peer when a worker is lost and recovery is
   *   off or itself fails; RangeError for a token outside the vocabulary or past the context.
   */
  async forward(tokens: readonly number[], allLogits = false): Promise<Float32Array> {
    this.#throwIfFailed()
    const { dim, vocabSize } = this.model.config
    for (const token of tokens) {
      if (!Number.isInteger(token) || token < 0 || token >= vocabSize) throw new RangeError(`token id ${token} is outside the vocabulary of ${vocabSize}`)
    }
    if (this.#position + tokens.length > this.#plan.model.maxSeqLen) {
      throw new RangeError(`cannot forward to position ${this.#position + tokens.length}: the model's context is ${this.#plan.model.maxSeqLen}`)
    }
    // A recovery of this pass: when it began (the failed pass's start), how long the loss took to show, what it did.
    let recovery: { readonly startedAt: number; readonly detectMs: number; report: RecoveryPhases } | null = null
    let x: Float32Array
    let fed: number
    for (;;) {
      const passStart = performance.now()
      if (this.#recover && this.#live().length < this.#links.length) {
        // A worker was lost (now, or while idle): replace it, then run the sequence so far plus `tokens`.
        recovery ??= { startedAt: passStart, detectMs: 0, report: emptyPhases() }
        recovery.report = mergePhases(recovery.report, await this.#recoverLost())
      }
      const feed = recovery ? [...this.#history, ...tokens] : tokens
      try {
        x = await this.#pass(feed)
        fed = feed.length
        break
      } catch (err) {
        if (!this.#lossOf(err as Error)) throw this.#failure ?? err
        // The time from this pass's start to here went into noticing the loss.
        recovery ??= { startedAt: passStart, detectMs: performance.now() - passStart, report: emptyPhases() }
      }
    }
    if (recovery) {
      const now = performance.now()
      const r = recovery.report
      this.#recovered({
        ...r,
        detectMs: recovery.detectMs,
        rebuildMs: now - recovery.startedAt - recovery.detectMs - r.abortMs - r.replanMs - r.reshardMs,
        totalMs: now - recovery.startedAt,
      })
    }
    this.#history.push(...tokens)
    this.#position = this.#history.length
    const rows = allLogits ? x.subarray((fed - tokens.length) * dim) : x.subarray(x.length - dim)
    const headStart = performance.now()
    const out = await this.#head.run({ x: { data: rows, dims: [rows.length / dim, dim] } })
    this.counters.headMs += performance.now() - headStart
    return out.logits!.data as Float32Array
  }

  /** Records a completed recovery and tells `onRecovered`. */
  #recovered(report: RecoveryReport): void {
    this.recoveries.push(report)
    log('recovered: %o', report)
    try {
      this.#options.onRecovered?.(report)
    } catch (err) {
      log.error('onRecovered threw: %s', (err as Error).message)
    }
  }

  /**
   * One pass of `tokens` at positions position..position+n-1 through every stage (position is 0 after a recovery).
   * @returns the final hidden state [n, dim] f32
   */
  async #pass(tokens: readonly number[]): Promise<Float32Array> {
    const { dim } = this.model.config
    const pos0 = this.#position
    let x: Float32Array = new Float32Array(tokens.length * dim) // [seq, dim] f32
    const emb = this.#embedding
    for (const [i, token] of tokens.entries()) {
      if (emb.bits === 32) x.set(emb.data.subarray(token * dim, (token + 1) * dim), i * dim)
      else nbitsRowF32(emb, token, x.subarray(i * dim, (i + 1) * dim))
    }
    const step = this.#step++
    const header = { type: 'forward', step, pos0, seq: tokens.length }
    const tracer = this.#tracer
    const send = (l: WorkerLink, body: Float32Array): Promise<void> => {
      const bytes = new Uint8Array(body.buffer, body.byteOffset, body.byteLength)
      return tracer ? tracedLink(l.channel, tracer).send(header, bytes) : this.#send(l, header, bytes)
    }
    // The round deadline grows with the pass (see peer-deadline.ts); so does the silence the watchdog allows.
    const deadlineMs = stepDeadlineMs(this.#deadlineMs, this.model.config, tokens.length, pos0 + tokens.length)
    const hub = this.#hub
    const allreduce = hub ? { allreduce: (tag: number, partial: Float32Array | null) => hub.allreduce(tag, partial, { deadlineMs }) } : LOCAL_ALLREDUCE
    this.#inFlight = { seq: tokens.length, end: pos0 + tokens.length }
    try {
      for (const stage of this.#stages) {
        if (stage.kind === 'local') {
          await Promise.all(stage.members.map((l) => send(l, x)))
          await this.#runLocal(x, pos0, step, allreduce)
          continue
        }
        const t0 = performance.now()
        const out = this.#expect(stage.leader, 'stage-out')
        out.catch(() => {}) // awaited below, unless the send fails first
        await send(stage.leader, x)
        const frame = await out
        if (frame.header.step !== step || frame.header.seq !== tokens.length) {
          throw new PeerFailedError(stage.leader.channel.remotePeer, `worker ${stage.leader.index} (${stage.leader.address}) answered forward pass ${step} with the output of pass ${String(frame.header.step)}`)
        }
        x = f32Body(frame)
        if (x.length !== tokens.length * dim) {
          throw new PeerFailedError(stage.leader.channel.remotePeer, `worker ${stage.leader.index} (${stage.leader.address}) returned ${x.length} values for ${tokens.length} positions of ${dim}`)
        }
        this.counters.stageWaitMs += performance.now() - t0
      }
    } finally {
      this.#inFlight = null
    }
    for (const stage of this.#stages) if (stage.plan.devices.length > 1) this.counters.allreduces += 2 * stage.plan.layers.count
    return x
  }

  /**
   * Runs the master's shards of its stage on `x` [seq, dim] f32 in place: its own, plus those it took over from lost
   * workers, which share its seat in the allreduce (their partials summed in shard order).
   */
  async #runLocal(x: Float32Array, pos0: number, step: number, allreduce: Allreduce): Promise<void> {
    const runners = [this.#runner!, ...this.#adopted.map((a) => a.runner)]
    if (runners.length === 1) {
      await runners[0]!.forward(x, pos0, step, allreduce, this.counters.timings, this.#tracer)
      return
    }
    const group = localAllreduceGroup(runners.length, allreduce)
    const xs = runners.map((_, i) => (i === 0 ? x : x.slice())) // every shard starts from the same hidden state
    const scratch: ForwardTimings = { computeMs: 0, allreduceMs: 0, ioWaitMs: 0 }
    const runs = runners.map((r, i) => r.forward(xs[i]!, pos0, step, group.members[i]!, i === 0 ? this.counters.timings : scratch, i === 0 ? this.#tracer : undefined))
    try {
      await Promise.all(runs)
    } catch (err) {
      group.fail(err as Error)
      await Promise.allSettled(runs)
      throw err
    }
  }

  /**
   * Whether `err` (a pass's failure) comes from a lost worker that a recovery can replace: marks the worker it names
   * lost (a stalled allreduce member), and fails the cluster when recovery is off.
   */
  #lossOf(err: Error): boolean {
    if (this.#closing) return false
    const named = (err as { peer?: unknown }).peer
    if (LOSS_ERRORS.has(err.name) && typeof named === 'string') {
      const link = this.#live().find((l) => l.channel.remotePeer === named)
      if (link) {
        const failure =
          err.name === 'PeerStalledError' ? new PeerStalledError(named, `worker ${link.index} (${link.address}) stalled: ${err.message}`, { cause: err }) : err
        this.#lose(link, failure)
      }
    }
    if (!this.#recover) return false
    return this.#live().length < this.#links.length
  }

  /**
   * Replaces the lost workers: survivors abort what is in flight, the master plans tensor parallelism over itself and
   * the survivors and installs it. Starts again when another worker is lost meanwhile. The KV cache is then empty:
   * the caller re-runs the sequence.
   * @throws whatever is not a worker's loss (a survivor refusing its new shard, e.g. MemoryBudgetError)
   */
  async #recoverLost(): Promise<RecoveryPhases> {
    const lost: LostWorker[] = []
    /** Shards of the workers lost so far that the master has not taken over yet (`adopt`). */
    const orphans: number[] = []
    let abortMs = 0
    let replanMs = 0
    let reshardMs = 0
    let replan: ReplanChoice | null = null
    for (let attempt = 1; ; attempt++) {
      for (const l of this.#links.filter((link) => link.lost)) {
        const reason = l.lost!
        lost.push({
          device: l.index,
          peer: l.channel.remotePeer,
          address: l.address,
          kind: reason.name === 'PeerStalledError' ? 'stalled' : 'gone',
          reason: reason.message,
          ...(l.report ? { report: l.report.message } : {}),
          silentMs: Math.max(0, l.lostAt - l.heardAt),
          detectedAtMs: l.lostAtWallMs,
        })
        if (l.hubIndex >= 0) orphans.push(l.shardIndex)
        this.#gone.push(l)
      }
      this.#links = this.#live()
      this.#hub = null
      for (const waiting of this.#replies.values()) waiting.reject(new Error('superseded by a recovery'))
      this.#replies.clear()
      const epoch = ++this.#epoch
      const survivors = this.#links
      // Adopt while the plan is tensor parallelism over the master, with its share resident, and every lost worker
      // held a shard of it; otherwise plan evenly again.
      const stage = this.#stages[0]
      const adopt =
        this.#strategy === 'adopt' &&
        this.#clusterPlan.stages.length === 1 &&
        stage?.kind === 'local' &&
        this.#options.memoryBudgetBytes === undefined &&
        lost.every((w) => this.#gone.find((l) => l.index === w.device)!.hubIndex >= 0)
      log('recovery %d (attempt %d, %s): %d workers left', epoch, attempt, adopt ? 'adopt' : 'even', survivors.length)
      try {
        let t = performance.now()
        await settleAll(
          survivors.map(async (l) => {
            const acked = this.#expect(l, 'aborted')
            acked.catch(() => {})
            await this.#send(l, { type: 'abort', epoch, step: this.#step, ...(adopt ? { keep: true } : {}) })
            await acked
          }),
        )
        abortMs += performance.now() - t
        t = performance.now()
        this.#position = 0
        if (adopt) {
          // Survivors keep their shards (their KV caches were reset); the master loads the lost ones from its file.
          while (orphans.length > 0) {
            await this.#adopt(orphans[0]!)
            orphans.shift()
          }
          this.#runner?.reset()
          for (const a of this.#adopted) a.runner.reset()
          const tracer = this.#tracer
          for (const [i, l] of survivors.entries()) l.hubIndex = i
          this.#hub =
            survivors.length > 0
              ? new StarAllreduceHub(survivors.map((l) => (tracer ? tracedLink(l.channel, tracer) : l.channel)), { deadlineMs: this.#deadlineMs, wireDtype: this.#wireDtype })
              : null
          this.#stages = [{ kind: 'local', plan: this.#clusterPlan.stages[0]!, members: survivors }]
          reshardMs += performance.now() - t
        } else {
          replan = this.#replan(survivors.map((l) => l.index))
          const why = (device: number): string => {
            const w = lost.find((x) => x.device === device)
            return w ? `lost: ${w.kind === 'stalled' ? 'stalled' : 'went away'}` : 'not in the plan'
          }
          const plan: ClusterPlan = { ...replan.plan, excluded: this.#absent(replan.plan).map((device) => ({ device, reason: why(device) })) }
          replanMs += performance.now() - t
          t = performance.now()
          this.#stages = []
          await this.#install(plan, false)
          orphans.length = 0
          reshardMs += performance.now() - t
        }
        // A survivor lost meanwhile would stall the first pass: go again without it now.
        if (this.#live().length < this.#links.length) throw new Error('a worker was lost while the cluster recovered')
        const masterShards = [0, ...this.#adopted.map((a) => a.shardIndex)]
        return {
          lost,
          strategy: adopt ? 'adopt' : 'even',
          ...(replan && !adopt ? { replan: { by: replan.by, why: replan.why } } : {}),
          masterShards,
          peers: survivors.length + 1,
          positions: this.#history.length,
          abortMs,
          replanMs,
          reshardMs,
          attempts: attempt,
        }
      } catch (err) {
        // Nobody else was lost meanwhile: this is not a loss a re-plan can fix (or the cluster is stopping).
        if (this.#closing || this.#live().length === this.#links.length) {
          this.#failure ??= err as Error
          throw err
        }
        log('recovery %d failed (%s): going again without the workers lost meanwhile', epoch, (err as Error).message)
      }
    }
  }

  /**
   * The plan over the master and workers `devices` (see replan.ts): the planner's when the master and every one of
   * them published a measured profile, else the even tensor-parallel split.
   */
  #replan(devices: readonly number[]): ReplanChoice {
    const master = masterCapabilities()
    const budget = this.#options.memoryBudgetBytes
    const choice = replanOver(
      this.model,
      [
        { device: 0, ...(master ? { capabilities: master } : {}), ...(budget !== undefined ? { budgetBytes: budget } : {}) },
        ...[...devices].sort((a, b) => a - b).map((device) => {
          const p = this.#profiles.get(device)
          return { device, ...(p?.capabilities ? { capabilities: p.capabilities } : {}), ...(p ? { rttMs: p.rttMs } : {}) }
        }),
      ],
      { nDevices: this.#addresses.length + 1, quantizedMatmul: this.#plan.quantizedMatmul },
    )
    log('re-plan over %d devices by %s: %s', devices.length + 1, choice.by, choice.why)
    return choice
  }

  /** Workers the cluster has had that `plan` gives no part, by device index. */
  #absent(plan: ClusterPlan): number[] {
    const used = new Set(plan.stages.flatMap((s) => s.devices))
    return this.#addresses.map((_, i) => i + 1).filter((d) => !used.has(d))
  }

  /** Takes over shard `shardIndex` of the master's stage: slices it from the model file and loads it here. */
  async #adopt(shardIndex: number): Promise<void> {
    const started = performance.now()
    const plan = this.#plan
    const own: LayerShardWeights[] = Array.from({ length: this.model.config.nLayers }, () => ({ attention: null, ffn: null }))
    for (let layer = plan.layers.start; layer < plan.layers.start + plan.layers.count; layer++) {
      own[layer] = ownedLayerShard(sliceLayerShard(plan.model, plan.shards[shardIndex]!, layer, this.#source))
      this.#source.clearLayer(layer)
    }
    const sliced = performance.now()
    const runner = await ShardRunner.create(plan, shardIndex, own, { threads: this.#options.threads })
    this.#adopted = [...this.#adopted, { shardIndex, runner }].sort((a, b) => a.shardIndex - b.shardIndex)
    log('took over shard %d: sliced in %d ms, loaded in %d ms', shardIndex, Math.round(sliced - started), Math.round(performance.now() - sliced))
  }

  /**
   * Declares `link` lost: aborts its stream (a stalled process must not block anything), fails what waits on it, and
   * tells `onWorkerLost`. Without recovery the cluster fails with `failure`.
   */
  #lose(link: WorkerLink, failure: Error): void {
    if (link.lost || this.#closing) return
    link.lost = failure
    link.lostAt = performance.now()
    link.lostAtWallMs = Date.now()
    log.error('%s', failure.message)
    link.channel.abort(failure)
    if (link.hubIndex >= 0) this.#hub?.fail(link.hubIndex, failure)
    if (!this.#recover) this.#failure ??= failure
    // Its own replies fail; so does any stage's output (the pass cannot complete with a peer missing).
    for (const [key, waiting] of this.#replies) {
      if (key.startsWith(`${link.index}:`) || key.endsWith(':stage-out') || !this.#recover) {
        this.#replies.delete(key)
        waiting.reject(this.#failure ?? failure)
      }
    }
    try {
      this.#options.onWorkerLost?.(link.index, link.channel.remotePeer, failure)
    } catch (err) {
      log.error('onWorkerLost threw: %s', (err as Error).message)
    }
  }

  /** Rejects what waits on `link`'s replies with `err`. */
  #rejectReplies(link: WorkerLink, err: Error): void {
    for (const [key, waiting] of this.#replies) {
      if (!key.startsWith(`${link.index}:`)) continue
      this.#replies.delete(key)
      waiting.reject(err)
    }
  }

  /** Workers not lost. */
  #live(): WorkerLink[] {
    return this.#links.filter((l) => !l.lost)
  }

  /**
   * The silence watchdog: a worker from which nothing arrived (no frame, no heartbeat) for the deadline of the pass in
   * flight (the base deadline when idle) is lost with PeerStalledError. A tick that comes late means this process was
   * busy (it could not read either): every worker gets a fresh window then.
   */
  #startWatchdog(): void {
    if (this.#links.length === 0) return
    const intervalMs = Math.max(5, Math.min(250, this.#deadlineMs / 8))
    this.#lastTick = performance.now()
    for (const l of this.#links) {
      l.heardAt = this.#lastTick
      l.heardBytes = l.channel.bytesReceived
    }
    this.#watchdog = setInterval(() => {
      const now = performance.now()
      const previous = this.#lastTick
      const late = now - previous > 3 * intervalMs
      this.#lastTick = now
      const f = this.#inFlight
      const limitMs = f ? stepDeadlineMs(this.#deadlineMs, this.model.config, f.seq, f.end) : this.#deadlineMs
      for (const l of this.#live()) {
        const bytes = l.channel.bytesReceived
        if (late) {
          l.heardBytes = bytes
          l.heardAt = now
        } else if (bytes !== l.heardBytes) {
          // Bytes (a frame's first part, say) came since the last tick; frames themselves stamp the exact time.
          l.heardBytes = bytes
          l.heardAt = Math.max(l.heardAt, previous)
        } else if (now - l.heardAt > limitMs) {
          const silentMs = Math.round(now - l.heardAt)
          this.#lose(l, new PeerStalledError(l.channel.remotePeer, `worker ${l.index} (${l.address}) stalled: nothing from peer ${l.channel.remotePeer} for ${silentMs} ms (deadline ${Math.round(limitMs)} ms)`))
        }
      }
    }, intervalMs)
    this.#watchdog.unref()
  }

  /**
   * Counters of every peer, the master first: forward passes, compute / allreduce-wait / I/O-wait ms, the weight
   * window, and memory. Asks each worker over its stream (with recovery on, a worker lost meanwhile is left out).
   */
  async peerStats(): Promise<(WorkerStats & { readonly peer: string })[]> {
    this.#throwIfFailed()
    const links = this.#live()
    const workers = await Promise.all(
      links.map((l) =>
        this.#request(l, 'stats').then(
          (frame) => ({ ...(frame.header as unknown as WorkerStats), peer: l.channel.remotePeer }),
          (err: unknown) => {
            if (this.#recover && l.lost) return null
            throw err
          },
        ),
      ),
    )
    const t = this.counters.timings
    const master = {
      peer: this.#node?.peerId ?? 'master',
      forwards: this.#step,
      computeMs: t.computeMs,
      allreduceMs: t.allreduceMs,
      ioWaitMs: t.ioWaitMs,
      window: this.#runner?.weights.window ?? 0,
      ...memoryUsage(),
      overheadBytes: this.#overheadBytes,
    }
    return [master, ...workers.filter((w) => w !== null)]
  }

  /** Device index of each worker in the plan, in the order of {@link peerStats} after the master. */
  get workerDevices(): readonly number[] {
    return this.#live().map((l) => l.index)
  }

  /**
   * Every peer's spans recorded since the last call, merged onto the master's clock as a Chrome trace (pid 1 the
   * master, pid i+1 worker i). Each worker's clock offset is estimated from its reply (NTP, see trace.ts).
   * @throws RangeError when the cluster was started without `trace: true`; PeerFailedError when a worker is gone.
   */
  async trace(): Promise<ChromeTrace> {
    this.#throwIfFailed()
    const tracer = this.#tracer
    if (!tracer) throw new RangeError('cannot collect a trace: the cluster was started without tracing')
    const workers = await Promise.all(
      this.#live().map(async (l): Promise<PeerTrace> => {
        const sentMs = wallClockMs()
        const frame = await this.#request(l, 'trace')
        const receivedMs = wallClockMs()
        const h = frame.header as unknown as WorkerTraceHeader
        const spans = JSON.parse(new TextDecoder().decode(frame.body)) as RecordedSpan[]
        return {
          peer: l.channel.remotePeer,
          role: `worker ${l.index}`,
          trace: { timeOriginMs: h.timeOriginMs, spans },
          offsetMs: clockOffsetMs(sentMs, h.receivedMs, h.sentMs, receivedMs),
        }
      }),
    )
    const master: PeerTrace = { peer: this.#node?.peerId ?? 'master', role: 'master', trace: tracer.take(), offsetMs: 0 }
    return mergeTraces([master, ...workers])
  }

  /** Says goodbye to the workers, closes the streams and the node, releases the sessions. */
  async stop(): Promise<void> {
    this.#closing = true
    clearInterval(this.#watchdog)
    await Promise.all(
      this.#live().map(async (l) => {
        await this.#send(l, { type: 'bye' }).catch(() => {})
        log('bye sent to worker %d', l.index)
        await l.channel.close().catch(() => {})
        // The worker closes its half once it has read `bye`: wait for that (bounded), so that stopping the node
        // next cannot cut the stream before the worker has seen the end of its session.
        await Promise.race([l.channel.closed.catch(() => {}), sleep(BYE_TIMEOUT_MS, undefined, { ref: false })])
        log('closed worker %d', l.index)
      }),
    )
    await this.#node?.stop()
    log('node stopped')
    await this.#runner?.release()
    for (const a of this.#adopted) await a.runner.release()
    await this.#head.release()
    await this.#removeShardFiles()
  }

  /** Removes the shard files this master wrote to the default directory (sliding-window mode). */
  async #removeShardFiles(): Promise<void> {
    for (const dir of this.#ownShardDirs) await rm(dir, { recursive: true, force: true }).catch(() => {})
    this.#ownShardDirs.clear()
  }

  #throwIfFailed(): void {
    if (this.#failure) throw this.#failure
  }

  async #send(link: WorkerLink, header: Record<string, unknown>, body?: Uint8Array): Promise<void> {
    await link.channel.send(header as { type: string }, body)
  }

  /** Frame bytes the master has sent plus received over all worker streams (encrypted payload, before noise). */
  get wireBytes(): number {
    return [...this.#links, ...this.#gone].reduce((sum, l) => sum + l.channel.bytesSent + l.channel.bytesReceived, 0)
  }

  /**
   * Reads one worker's frames for the whole session: allreduce partials of the master's stage go to the hub, replies
   * to their requests, heartbeats only show it is alive; a failure of its own, or its stream ending, loses it; a
   * failure it reports of another worker loses that one. Frames about passes of an aborted epoch are dropped.
   */
  async #route(link: WorkerLink): Promise<void> {
    try {
      for await (const frame of link.channel) {
        if (this.#tracer) traceReceive(this.#tracer, frame.header, frame.body.byteLength, link.channel.remotePeer)
        link.heardAt = performance.now()
        const type = frame.header.type
        if (type === 'ping') continue
        if (type === 'aborted') {
          if (frame.header.epoch !== this.#epoch) continue // an older recovery's answer
          link.epoch = this.#epoch
          this.#reply(link, frame)
          continue
        }
        const current = link.epoch === this.#epoch
        if (type === 'error') {
          const message = String(frame.header.message)
          const culprit = typeof frame.header.peer === 'string' && frame.header.peer !== link.channel.remotePeer ? frame.header.peer : null
          if (culprit === null) {
            link.report = { message, errorName: typeof frame.header.errorName === 'string' ? frame.header.errorName : undefined }
            throw new PeerFailedError(link.channel.remotePeer, `worker ${link.index} (${link.address}) failed: ${message}`)
          }
          // It names another worker (a stage member gone): that one is lost; this one waits for the re-plan.
          if (!current) continue // about passes already given up on
          const failure = new PeerFailedError(culprit, `worker ${link.index} (${link.address}) failed: ${message}`)
          const target = this.#live().find((l) => l.channel.remotePeer === culprit)
          if (target && this.#recover) {
            this.#lose(target, failure)
            this.#rejectReplies(link, failure) // e.g. the stage-ready or stage-out it cannot give now
          } else {
            if (!this.#recover) this.#failure ??= failure
            throw failure
          }
          continue
        }
        if (!current) continue // a frame of a pass the master gave up on
        if (type === 'ar' && link.hubIndex >= 0) {
          this.#hub?.deliver(link.hubIndex, frame)
        } else if (type === 'stats' || type === 'trace' || type === 'ready' || type === 'stage-ready' || (type === 'stage-out' && link.role === 'leader')) {
          this.#reply(link, frame)
        } else {
          throw new PeerFailedError(link.channel.remotePeer, `worker ${link.index} (${link.address}) sent an unexpected ${String(type)} frame`)
        }
      }
      if (!this.#closing) throw new PeerGoneError(link.channel.remotePeer)
    } catch (err) {
      if (this.#closing || link.lost) return
      const failure =
        err instanceof PeerFailedError
          ? err
          : new PeerFailedError(
              link.channel.remotePeer,
              `worker ${link.index} (${link.address}) went away during generation: ${(err as Error).message}`,
              { cause: err },
            )
      this.#lose(link, failure)
    }
  }

  /** Waits for the next `type` reply of one worker; rejected when it is lost (or the cluster fails) first. */
  #expect(link: WorkerLink, type: ReplyType): Promise<Frame> {
    if (this.#failure) return Promise.reject(this.#failure)
    if (link.lost) return Promise.reject(link.lost)
    const key = `${link.index}:${type}`
    if (this.#replies.has(key)) return Promise.reject(new RangeError(`a ${type} request to worker ${link.index} is already waiting`))
    return new Promise<Frame>((resolve, reject) => this.#replies.set(key, { resolve, reject }))
  }

  /** Sends a `type` request to one worker and waits for its reply frame of the same type. */
  #request(link: WorkerLink, type: 'stats' | 'trace'): Promise<Frame> {
    const reply = this.#expect(link, type)
    this.#send(link, { type }).catch((err: unknown) => {
      const waiting = this.#replies.get(`${link.index}:${type}`)
      this.#replies.delete(`${link.index}:${type}`)
      waiting?.reject(err as Error)
    })
    return reply
  }

  #reply(link: WorkerLink, frame: Frame): void {
    const key = `${link.index}:${String(frame.header.type)}`
    const waiting = this.#replies.get(key)
    if (!waiting) throw new PeerFailedError(link.channel.remotePeer, `worker ${link.index} (${link.address}) sent an unrequested ${String(frame.header.type)} frame`)
    this.#replies.delete(key)
    waiting.resolve(frame)
  }
}

/** A new worker link on `channel`, with no part in a plan yet. */
function workerLink(index: number, address: string, channel: FramedChannel, epoch: number): WorkerLink {
  return {
    index,
    address,
    channel,
    stage: -1,
    shardIndex: -1,
    role: 'member',
    hubIndex: -1,
    lost: null,
    lostAt: 0,
    lostAtWallMs: 0,
    epoch,
    heardAt: performance.now(),
    heardBytes: 0,
    report: null,
  }
}

/** The tensor-parallel plan of the master's stage, else the first stage's. */
function masterPlanOf(plan: ClusterPlan): TensorParallelPlan {
  return (plan.stages.find((s) => s.devices.includes(0)) ?? plan.stages[0]!).tensorParallel
}

/** What a recovery did before the sequence is re-run (see {@link RecoveryReport}). */
type RecoveryPhases = Omit<RecoveryReport, 'rebuildMs' | 'totalMs' | 'detectMs'>

function emptyPhases(): RecoveryPhases {
  return { lost: [], strategy: 'even', masterShards: [0], peers: 0, positions: 0, abortMs: 0, replanMs: 0, reshardMs: 0, attempts: 0 }
}

/** Two recoveries of one pass (a worker lost while re-running the sequence) as one report. */
function mergePhases(a: RecoveryPhases, b: RecoveryPhases): RecoveryPhases {
  return {
    lost: [...a.lost, ...b.lost],
    strategy: b.strategy,
    ...(b.replan ? { replan: b.replan } : {}),
    masterShards: b.masterShards,
    peers: b.peers,
    positions: b.positions,
    abortMs: a.abortMs + b.abortMs,
    replanMs: a.replanMs + b.replanMs,
    reshardMs: a.reshardMs + b.reshardMs,
    attempts: a.attempts + b.attempts,
  }
}

/** Waits for every promise to settle, then throws the first rejection (nothing is left in flight on a stream). */
async function settleAll(promises: readonly Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(promises)
  const failed = results.find((r) => r.status === 'rejected')
  if (failed) throw failed.reason
}

/**
 * The error of a worker that failed a step of its setup (`what`: "refused its shard"): what it reported when it did
 * (MemoryBudgetError when its budget was too small), else why its stream ended.
 */
function refusal(link: WorkerLink, what: string, err: unknown): Error {
  const report = link.report
  if (!report) return err as Error
  const message = `worker ${link.index} (${link.address}) ${what}: ${report.message}`
  if (report.errorName === MemoryBudgetError.name) return new MemoryBudgetError(message, 0)
  return new PeerFailedError(link.channel.remotePeer, message, { cause: err })
}

/** A device's role in its stage: member of the master's stage, or leader / member of a stage without it. */
function stageRole(stage: StagePlan, shardIndex: number): StageRole {
  if (stage.devices.includes(0)) return 'member'
  return shardIndex === 0 ? 'leader' : 'stage-member'
}

/**
 * The tensor-parallel plan for `model` over `nPeers` peers, with the block constraints its storage imposes.
 * Pure: call it before starting any process to refuse an impossible plan early.
 * @throws RangeError naming the numbers (see `planTensorParallel`).
 */
export function planCluster(model: ModelDescription, nPeers: number, quantizedMatmul: 'exact' | 'int8' = 'exact'): TensorParallelPlan {
  return planTensorParallel(model.config, nPeers, { ...planConstraints(model), quantizedMatmul })
}

/** Block constraints of the plan from how W2 and Wo are stored (quantized ones cut only on 32-column blocks). */
export function planConstraints(model: ModelDescription): TensorParallelOptions {
  const quantized = (name: string): boolean => {
    const dtype = model.tensors.get(name)?.dtype
    return dtype === 'q4_0' || dtype === 'q8_0'
  }
  const layers = Array.from({ length: model.config.nLayers }, (_, i) => i)
  return {
    ffnBlock: layers.some((i) => quantized(`blk.${i}.ffn_down.weight`)) ? 32 : 1,
    attentionBlock: layers.some((i) => quantized(`blk.${i}.attn_output.weight`)) ? 32 : 1,
  }
}
