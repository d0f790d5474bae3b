import { randomBytes } from 'node:crypto'
import { logger } from '@libp2p/logger'
import {
  buildOutputHead,
  type ClusterPlan,
  checkClusterPlan,
  type LayerShardWeights,
  type LinearWeight,
  type ModelDescription,
  nbitsRowF32,
  planTensorParallel,
  readTensorBytes,
  readTensorF32,
  sliceLayerShard,
  type StagePlan,
  type TensorParallelOptions,
  type TensorParallelPlan,
  tensorParallelClusterPlan,
  toLinearWeight,
  type WeightSource,
} from '../splitter/index.ts'
import {
  f32Body,
  type Frame,
  type FramedChannel,
  type LinkEmulation,
  LinkShaper,
  PeerGoneError,
  StarAllreduceHub,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
  type TransportNodeOptions,
} from '../transport/index.ts'
import { PeerFailedError } from './errors.ts'
import { checkDistinctWorkers } from './membership.ts'
import { defaultShardDir, encodeLayerShard, kvCacheBytes, ownedLayerShard } from './shard-encoding.ts'
import { Session } from './runtime.ts'
import { asConstants, type ForwardTimings, linearFeeds, ShardRunner } from './shard-runner.ts'
import { LOCAL_ALLREDUCE } from './stage-worker.ts'
import { type LinkMeasurement, type LinkProbeOptions, probeLink } from './link-probe.ts'
import { MemoryBudgetError, openShard, ShardFileWriter, type WeightStore } from './weight-store.ts'
import { memoryUsage } from './memory.ts'
import type { EmulatedLink, StageRole, WorkerStats, WorkerTraceHeader } from './protocol.ts'
import { type ChromeTrace, clockOffsetMs, mergeTraces, type PeerTrace, type RecordedSpan, TraceRecorder, traceReceive, tracedLink, type Tracer, wallClockMs } from './trace.ts'

const log = logger('edgeshard:agent:cluster')

/** A worker the master drives: its channel, where it was reached, and its part in the plan. */
interface WorkerLink {
  /** Device index (workers are devices 1..N-1 in the order given). */
  readonly index: number
  readonly address: string
  readonly channel: FramedChannel
  /** Index of its stage in the plan. */
  readonly stage: number
  /** Its shard in the stage's tensor-parallel plan. */
  readonly shardIndex: number
  readonly role: StageRole
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

/**
 * The master's view of a cluster: it owns the model file and the plan, sends each worker its stage's plan and its
 * shard of that stage's layers, keeps the embedding, final norm and classifier (plus its own shard when it is in a
 * stage), and drives forward passes: stage by stage in layer order, with a star allreduce inside each stage (itself
 * the hub of its own stage, a leader the hub of the others; see stage-worker.ts). Raw text and token ids never leave
 * this object: workers receive hidden states only.
 */
export class Cluster {
  /** The master's stage's tensor-parallel plan (the whole model for pure tensor parallelism), else the first stage's. */
  readonly plan: TensorParallelPlan
  /** Every stage, its devices and layers. */
  readonly clusterPlan: ClusterPlan
  readonly model: ModelDescription
  readonly counters: ClusterCounters = { allreduces: 0, timings: { computeMs: 0, allreduceMs: 0, ioWaitMs: 0 }, stageWaitMs: 0, headMs: 0 }
  readonly #node: TransportNode | null
  readonly #links: readonly WorkerLink[]
  readonly #stages: readonly StageExecution[]
  readonly #hub: StarAllreduceHub | null
  readonly #runner: ShardRunner | null
  readonly #head: Session
  readonly #embedding: LinearWeight // [vocab, dim], dense or quantized
  #step = 0
  #position = 0
  #failure: Error | null = null
  #closing = false
  /**
   * Replies awaited, by `device:type` (`stats`, `trace`, `stage-out`); all are rejected when any worker fails, since
   * that fails the cluster.
   */
  readonly #replies = new Map<string, { resolve: (frame: Frame) => void; reject: (err: Error) => void }>()
  #tracer: TraceRecorder | undefined
  #overheadBytes = 0

  private constructor(
    model: ModelDescription,
    clusterPlan: ClusterPlan,
    node: TransportNode | null,
    links: readonly WorkerLink[],
    stages: readonly StageExecution[],
    hub: StarAllreduceHub | null,
    runner: ShardRunner | null,
    head: Session,
    source: ModelWeights,
  ) {
    this.model = model
    this.clusterPlan = clusterPlan
    const local = stages.find((s) => s.kind === 'local')
    this.plan = (local ?? stages[0]!).plan.tensorParallel
    this.#node = node
    this.#links = links
    this.#stages = stages
    this.#hub = hub
    this.#runner = runner
    this.#head = head
    this.#embedding = source.linear('token_embd.weight')
  }

  /**
   * Plans the model over the master plus `options.workers` (or checks `options.plan`), dials every worker the plan
   * uses, sends plans and shards, loads the master's own shard, and connects the stages without the master.
   * @throws RangeError from the planner or the plan check (before any socket opens); DialError naming an unreachable
   *   worker; PeerFailedError when a worker refuses its shard or a leader cannot reach its members.
   */
  static async start(model: ModelDescription, options: ClusterOptions): Promise<Cluster> {
    const nDevices = options.workers.length + 1
    const clusterPlan = options.plan
      ? checkClusterPlan(options.plan, model.config, nDevices)
      : tensorParallelClusterPlan(model.config, nDevices, { ...planConstraints(model), quantizedMatmul: options.quantizedMatmul ?? 'exact' })
    const masterStageIndex = clusterPlan.stages.findIndex((s) => s.devices.includes(0))
    const masterStage = clusterPlan.stages[masterStageIndex]
    const source = new ModelWeights(model)
    let node: TransportNode | null = null
    const links: WorkerLink[] = []
    let hub: StarAllreduceHub | null = null
    let writer: ShardFileWriter | null = null
    const tracer = options.trace ? new TraceRecorder() : undefined
    const shapers = new Map<string, LinkShaper>()
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
          links.push({ index: u.device, address, channel, stage: u.stage, shardIndex: u.shardIndex, role: u.role })
        }
        // Before any plan or weight leaves: refuse two agents answering as one peer id (a copied identity key).
        await checkDistinctWorkers(node, links.map((l) => ({ index: l.index, address: l.address, peer: l.channel.remotePeer })), options.signal ? { signal: options.signal } : {})
      }
      const peerOf = (device: number): string => (device === 0 ? node!.peerId : links.find((l) => l.index === device)!.channel.remotePeer)
      const emulated = (from: number): EmulatedLink[] =>
        [0, ...links.map((l) => l.index)].flatMap((to) => {
          const link = to === from ? undefined : options.links?.(from, to)
          return link ? [{ peer: peerOf(to), rttMs: link.rttMs, bitsPerSecond: link.bitsPerSecond }] : []
        })
      const stageIds = clusterPlan.stages.map(() => randomBytes(8).toString('hex'))
      await Promise.all(
        links.map((l) => {
          const links = emulated(l.index)
          return l.channel.send({
            type: 'plan',
            plan: clusterPlan.stages[l.stage]!.tensorParallel,
            shardIndex: l.shardIndex,
            threads: options.threads,
            ...(tracer ? { trace: true } : {}),
            ...(l.role !== 'member' ? { role: l.role, stageId: stageIds[l.stage]! } : {}),
            ...(links.length > 0 ? { links } : {}),
          })
        }),
      )
      // Layer by layer: read the layer's tensors once, cut every peer's share, send it, forget the layer. Neither
      // the whole model nor a whole shard needs to be in memory at once.
      const budget = options.memoryBudgetBytes
      const shardDir = options.shardDir ?? defaultShardDir('master')
      const masterPlan = masterStage?.tensorParallel
      if (budget !== undefined && masterPlan) writer = await ShardFileWriter.create(shardDir)
      const own: LayerShardWeights[] = Array.from({ length: model.config.nLayers }, () => ({ attention: null, ffn: null }))
      const sent = links.map(() => 0)
      const inStage = (plan: TensorParallelPlan, layer: number): boolean => layer >= plan.layers.start && layer < plan.layers.start + plan.layers.count
      for (let layer = 0; layer < model.config.nLayers; layer++) {
        await Promise.all(
          links.map(async (link, i) => {
            const plan = clusterPlan.stages[link.stage]!.tensorParallel
            if (!inStage(plan, layer)) return
            for (const t of encodeLayerShard(sliceLayerShard(plan.model, plan.shards[link.shardIndex]!, layer, source))) {
              await link.channel.send({ type: 'tensor', layer, name: t.name, bits: t.bits, rows: t.rows, cols: t.cols }, t.body)
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
        options.onLayerDistributed?.(layer, model.config.nLayers)
      }
      await Promise.all(links.map((l, i) => l.channel.send({ type: 'load-done', tensors: sent[i]! })))
      let runner: ShardRunner | null = null
      if (masterPlan) {
        let store: WeightStore | LayerShardWeights[] = own
        if (writer) {
          const total = await writer.finish()
          writer = null
          store = await openShard(shardDir, { budgetBytes: budget!, kvCacheBytes: kvCacheBytes(masterPlan, 0) })
          log('master shard: %d bytes on disk', total)
        }
        runner = await ShardRunner.create(masterPlan, 0, store, { threads: options.threads, ...(budget !== undefined ? { lowMemory: true } : {}) })
      }
      const overheadBytes = memoryUsage().rssBytes
      await Promise.all(links.map((link) => awaitReady(link, options)))
      // Emulated links apply to the master's sends from here on, as they do on the workers.
      for (const l of links) {
        const link = options.links?.(0, l.index)
        if (link) shapers.set(l.channel.remotePeer, new LinkShaper(link))
      }
      // Stages without the master: each leader dials its members.
      const stages: StageExecution[] = clusterPlan.stages.map((plan, s) => {
        if (s === masterStageIndex) {
          return { kind: 'local', plan, members: plan.devices.slice(1).map((d) => links.find((l) => l.index === d)!) }
        }
        return { kind: 'remote', plan, leader: links.find((l) => l.index === plan.devices[0])! }
      })
      await Promise.all(
        stages.map(async (stage) => {
          if (stage.kind !== 'remote') return
          const members = stage.plan.devices.slice(1).map((d, i) => ({ address: options.workers[d - 1]!, shardIndex: i + 1 }))
          await stage.leader.channel.send({ type: 'stage', members })
          const reply = await firstFrame(stage.leader.channel)
          if (reply.header.type !== 'stage-ready') {
            const why = reply.header.type === 'error' ? String(reply.header.message) : `unexpected ${String(reply.header.type)} frame`
            const peer = typeof reply.header.peer === 'string' ? reply.header.peer : stage.leader.channel.remotePeer
            throw new PeerFailedError(peer, `worker ${stage.leader.index} (${stage.leader.address}) cannot lead its stage: ${why}`)
          }
        }),
      )
      const local = stages.find((s) => s.kind === 'local')
      if (local && local.members.length > 0) hub = new StarAllreduceHub(local.members.map((l) => (tracer ? tracedLink(l.channel, tracer) : l.channel)))
      // The classifier is baked into the head graph as an initializer (pre-packed by ORT; fast for MatMulNBits).
      const classifier = source.linear('output.weight')
      const head = await Session.create(
        'output_head',
        buildOutputHead(
          {
            dim: model.config.dim,
            vocabSize: model.config.vocabSize,
            normEps: model.config.normEps,
            bits: classifier.bits,
            quantizedMatmul: (masterPlan ?? clusterPlan.stages[0]!.tensorParallel).quantizedMatmul,
          },
          asConstants({
            output_norm: { data: source.vector('output_norm.weight'), dims: [model.config.dim] },
            ...linearFeeds('wcls', classifier),
          }),
        ),
        { threads: options.threads },
      )
      const cluster = new Cluster(model, clusterPlan, node, links, stages, hub, runner, head, source)
      source.clear()
      cluster.#overheadBytes = overheadBytes
      cluster.#tracer = tracer
      for (const link of links) void cluster.#route(link)
      return cluster
    } catch (err) {
      for (const link of links) link.channel.abort(err as Error)
      await node?.stop()
      throw err
    }
  }

  /** Devices in the plan, the master included (it always holds the embedding and the classifier). */
  get size(): number {
    return this.#links.length + 1
  }

  /** The master's tracer when started with `trace: true` (for spans such as tokens), else undefined. */
  get tracer(): Tracer | undefined {
    return this.#tracer
  }

  /** Positions in the KV cache. */
  get position(): number {
    return this.#position
  }

  /** Starts a new sequence on every peer (leaders relay it to their members). */
  async reset(): Promise<void> {
    this.#throwIfFailed()
    this.#runner?.reset()
    this.#position = 0
    await Promise.all(this.#links.filter((l) => l.role !== 'stage-member').map((l) => this.#send(l, { type: 'reset' })))
  }

  /**
   * Feeds `tokens` at positions position..position+n-1 through every layer: stage by stage in layer order, the
   * master's own stage with the master as allreduce hub, every other stage behind its leader (`forward` out,
   * `stage-out` back).
   * @param allLogits return logits for every fed position instead of only the last.
   * @returns logits [n or 1, vocab] f32.
   * @throws PeerFailedError naming the peer when a worker goes away or reports an error.
   */
  async forward(tokens: readonly number[], allLogits = false): Promise<Float32Array> {
    this.#throwIfFailed()
    const { dim, vocabSize } = this.model.config
    let x: Float32Array = new Float32Array(tokens.length * dim) // [seq, dim] f32
    const emb = this.#embedding
    for (const [i, token] of tokens.entries()) {
      if (!Number.isInteger(token) || token < 0 || token >= vocabSize) throw new RangeError(`token id ${token} is outside the vocabulary of ${vocabSize}`)
      if (emb.bits === 32) x.set(emb.data.subarray(token * dim, (token + 1) * dim), i * dim)
      else nbitsRowF32(emb, token, x.subarray(i * dim, (i + 1) * dim))
    }
    if (this.#position + tokens.length > this.plan.model.maxSeqLen) {
      throw new RangeError(`cannot forward to position ${this.#position + tokens.length}: the model's context is ${this.plan.model.maxSeqLen}`)
    }
    const pos0 = this.#position
    const step = this.#step++
    const header = { type: 'forward', step, pos0, seq: tokens.length }
    const tracer = this.#tracer
    const send = (l: WorkerLink, body: Float32Array): Promise<void> => {
      const bytes = new Uint8Array(body.buffer, body.byteOffset, body.byteLength)
      return tracer ? tracedLink(l.channel, tracer).send(header, bytes) : this.#send(l, header, bytes)
    }
    try {
      for (const stage of this.#stages) {
        if (stage.kind === 'local') {
          await Promise.all(stage.members.map((l) => send(l, x)))
          await this.#runner!.forward(x, pos0, step, this.#hub ?? LOCAL_ALLREDUCE, this.counters.timings, tracer)
          continue
        }
        const t0 = performance.now()
        const out = this.#expect(stage.leader, 'stage-out')
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
    } catch (err) {
      throw this.#failure ?? err
    }
    this.#position += tokens.length
    for (const stage of this.#stages) if (stage.plan.devices.length > 1) this.counters.allreduces += 2 * stage.plan.layers.count
    const rows = allLogits ? x : x.subarray(x.length - dim)
    const headStart = performance.now()
    const out = await this.#head.run({ x: { data: rows, dims: [rows.length / dim, dim] } })
    this.counters.headMs += performance.now() - headStart
    return out.logits!.data as Float32Array
  }

  /**
   * Counters of every peer, the master first: forward passes, compute / allreduce-wait / I/O-wait ms, the weight
   * window, and memory. Asks each worker over its stream.
   */
  async peerStats(): Promise<(WorkerStats & { readonly peer: string })[]> {
    this.#throwIfFailed()
    const workers = await Promise.all(
      this.#links.map(
        (l) =>
          this.#request(l, 'stats').then((frame) => ({ ...(frame.header as unknown as WorkerStats), peer: l.channel.remotePeer })),
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
    return [master, ...workers]
  }

  /**
   * Measures the link from the master to every worker in the plan over the real libp2p streams (round trip and
   * throughput, see link-probe.ts; emulated links included), by device index.
   * @throws PeerFailedError when the cluster has failed; whatever the probe throws
   */
  async probeLinks(options: LinkProbeOptions | ((device: number) => LinkProbeOptions) = {}): Promise<{ device: number; link: LinkMeasurement }[]> {
    this.#throwIfFailed()
    const out: { device: number; link: LinkMeasurement }[] = []
    for (const l of this.#links) {
      out.push({ device: l.index, link: await probeLink(this.#node!, l.address, typeof options === 'function' ? options(l.index) : options) })
    }
    return out
  }

  /** Device index of each entry of {@link peerStats} after the master (workers in the plan, by device). */
  get workerDevices(): readonly number[] {
    return this.#links.map((l) => l.index)
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
      this.#links.map(async (l): Promise<PeerTrace> => {
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
    await Promise.all(
      this.#links.map(async (l) => {
        await this.#send(l, { type: 'bye' }).catch(() => {})
        log('bye sent to worker %d', l.index)
        await l.channel.close().catch(() => {})
        log('closed worker %d', l.index)
      }),
    )
    await this.#node?.stop()
    log('node stopped')
    await this.#runner?.release()
    await this.#head.release()
  }

  #throwIfFailed(): void {
    if (this.#failure) throw this.#failure
  }

  async #send(link: WorkerLink, header: Record<string, unknown>, body?: Uint8Array): Promise<void> {
    await link.channel.send(header as { type: string }, body)
  }

  /** Frame bytes the master has sent plus received over all worker streams (encrypted payload, before noise). */
  get wireBytes(): number {
    return this.#links.reduce((sum, l) => sum + l.channel.bytesSent + l.channel.bytesReceived, 0)
  }

  /**
   * Reads one worker's frames for the whole session: allreduce partials of the master's stage go to the hub, replies
   * to their requests, errors fail the cluster.
   */
  async #route(link: WorkerLink): Promise<void> {
    const hubMember = link.role === 'member' ? link.shardIndex - 1 : -1
    try {
      for await (const frame of link.channel) {
        if (this.#tracer) traceReceive(this.#tracer, frame.header, frame.body.byteLength, link.channel.remotePeer)
        const type = frame.header.type
        if (type === 'ar' && hubMember >= 0) {
          this.#hub?.deliver(hubMember, frame)
        } else if (type === 'stats' || type === 'trace' || (type === 'stage-out' && link.role === 'leader')) {
          this.#reply(link, frame)
        } else if (type === 'error') {
          // A leader names the member that failed its stage; otherwise the worker itself failed.
          const peer = typeof frame.header.peer === 'string' ? frame.header.peer : link.channel.remotePeer
          throw new PeerFailedError(peer, `worker ${link.index} (${link.address}) failed: ${String(frame.header.message)}`)
        } else {
          throw new PeerFailedError(link.channel.remotePeer, `worker ${link.index} (${link.address}) sent an unexpected ${String(type)} frame`)
        }
      }
      if (!this.#closing) throw new PeerGoneError(link.channel.remotePeer)
    } catch (err) {
      if (this.#closing) return
      const failure =
        err instanceof PeerFailedError
          ? err
          : new PeerFailedError(
              link.channel.remotePeer,
              `worker ${link.index} (${link.address}) went away during generation: ${(err as Error).message}`,
              { cause: err },
            )
      log.error('%s', failure.message)
      this.#failure ??= failure
      if (hubMember >= 0) this.#hub?.fail(hubMember, failure)
      for (const waiting of this.#replies.values()) waiting.reject(this.#failure)
      this.#replies.clear()
    }
  }

  /** Waits for the next `type` reply of one worker; rejected when any worker fails first. */
  #expect(link: WorkerLink, type: 'stats' | 'trace' | 'stage-out'): Promise<Frame> {
    if (this.#failure) return Promise.reject(this.#failure)
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

/** A device's role in its stage: member of the master's stage, or leader / member of a stage without it. */
function stageRole(stage: StagePlan, shardIndex: number): StageRole {
  if (stage.devices.includes(0)) return 'member'
  return shardIndex === 0 ? 'leader' : 'stage-member'
}

async function awaitReady(link: WorkerLink, options: ClusterOptions): Promise<void> {
  const { channel } = link
  const reply = await firstFrame(channel)
  if (reply.header.type !== 'ready') {
    const why = reply.header.type === 'error' ? String(reply.header.message) : `unexpected ${String(reply.header.type)} frame`
    const message = `worker ${link.index} (${link.address}) refused its shard: ${why}`
    if (reply.header.errorName === MemoryBudgetError.name) throw new MemoryBudgetError(message, 0)
    throw new PeerFailedError(channel.remotePeer, message)
  }
  options.onWorkerReady?.(link.index, channel.remotePeer)
}

/**
 * The model's tensors as the slicer wants them, each read from the file once and cached until `clear()`:
 * 1-D tensors as f32, 2-D weights as linear weights (quantized ones stay quantized).
 */
class ModelWeights implements WeightSource {
  readonly #model: ModelDescription
  readonly #cache = new Map<string, LinearWeight | Float32Array>()

  constructor(model: ModelDescription) {
    this.#model = model
  }

  vector(name: string): Float32Array {
    let t = this.#cache.get(name)
    if (!t) {
      t = readTensorF32(this.#model, name)
      this.#cache.set(name, t)
    }
    return t as Float32Array
  }

  linear(name: string): LinearWeight {
    let t = this.#cache.get(name)
    if (!t) {
      const ref = this.#model.tensors.get(name)
      if (ref?.shape.length !== 2) throw new RangeError(`model ${this.#model.path} has no 2-D tensor ${name}`)
      t = toLinearWeight(ref.dtype, readTensorBytes(this.#model, name), ref.shape[0]!, ref.shape[1]!)
      this.#cache.set(name, t)
    }
    return t as LinearWeight
  }

  /** Forgets the cached tensors of layer `layer`. */
  clearLayer(layer: number): void {
    for (const name of this.#cache.keys()) if (name.startsWith(`blk.${layer}.`)) this.#cache.delete(name)
  }

  clear(): void {
    this.#cache.clear()
  }
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

async function firstFrame(channel: FramedChannel): Promise<Frame> {
  const it = channel[Symbol.asyncIterator]()
  const { value, done } = await it.next()
  if (done) throw new PeerGoneError(channel.remotePeer)
  return value
}
