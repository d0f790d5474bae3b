import { logger } from '@libp2p/logger'
import {
  buildOutputHead,
  type LayerShardWeights,
  type LinearWeight,
  type ModelDescription,
  nbitsRowF32,
  planTensorParallel,
  readTensorBytes,
  readTensorF32,
  sliceLayerShard,
  type TensorParallelOptions,
  type TensorParallelPlan,
  toLinearWeight,
  type WeightSource,
} from '../splitter/index.ts'
import {
  type Frame,
  type FramedChannel,
  PeerGoneError,
  StarAllreduceHub,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
} from '../transport/index.ts'
import { PeerFailedError } from './errors.ts'
import { defaultShardDir, encodeLayerShard, kvCacheBytes, ownedLayerShard } from './shard-encoding.ts'
import { Session } from './runtime.ts'
import { asConstants, type ForwardTimings, linearFeeds, ShardRunner } from './shard-runner.ts'
import { MemoryBudgetError, openShard, ShardFileWriter, type WeightStore } from './weight-store.ts'
import { memoryUsage } from './memory.ts'
import type { WorkerStats, WorkerTraceHeader } from './protocol.ts'
import { type ChromeTrace, clockOffsetMs, mergeTraces, type PeerTrace, type RecordedSpan, TraceRecorder, traceReceive, tracedLink, type Tracer, wallClockMs } from './trace.ts'

const log = logger('edgeshard:agent:cluster')

/** A worker the master drives: its channel and where it was reached. */
interface WorkerLink {
  readonly index: number
  readonly address: string
  readonly channel: FramedChannel
}

/** Options of {@link Cluster.start}. */
export interface ClusterOptions {
  /** Multiaddrs of running worker agents, in shard order (shards 1..N-1). */
  readonly workers: readonly string[]
  /** ORT intra-op threads on the master and each worker. */
  readonly threads: number
  readonly signal?: AbortSignal
  /** Called as each worker finishes loading its shard. */
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
}

/** Wire and time counters since the cluster started, for the run summary. */
export interface ClusterCounters {
  allreduces: number
  timings: ForwardTimings
}

/**
 * The master's view of a tensor-parallel cluster: it owns the model file, plans the shares, sends each worker its
 * shard, keeps shard 0 plus the embedding, final norm and classifier, and drives forward passes with a star
 * allreduce (itself the hub). Raw text and token ids never leave this object: workers receive hidden states only.
 */
export class Cluster {
  readonly plan: TensorParallelPlan
  readonly model: ModelDescription
  readonly counters: ClusterCounters = { allreduces: 0, timings: { computeMs: 0, allreduceMs: 0, ioWaitMs: 0 } }
  readonly #node: TransportNode | null
  readonly #links: readonly WorkerLink[]
  readonly #hub: StarAllreduceHub | null
  readonly #runner: ShardRunner
  readonly #head: Session
  readonly #embedding: LinearWeight // [vocab, dim], dense or quantized
  #step = 0
  #failure: Error | null = null
  #closing = false
  /** Per worker: the request (`stats`, `trace`) waiting for its reply; rejected if the worker fails first. */
  readonly #replies = new Map<number, { type: string; resolve: (frame: Frame) => void; reject: (err: Error) => void }>()
  #tracer: TraceRecorder | undefined
  #overheadBytes = 0

  private constructor(
    model: ModelDescription,
    plan: TensorParallelPlan,
    node: TransportNode | null,
    links: readonly WorkerLink[],
    hub: StarAllreduceHub | null,
    runner: ShardRunner,
    head: Session,
    source: ModelWeights,
  ) {
    this.model = model
    this.plan = plan
    this.#node = node
    this.#links = links
    this.#hub = hub
    this.#runner = runner
    this.#head = head
    this.#embedding = source.linear('token_embd.weight')
  }

  /**
   * Plans the model over the master plus `options.workers`, dials every worker, sends plans and shards, and loads
   * the master's own shard.
   * @throws RangeError from the planner (before any socket opens); DialError naming an unreachable worker;
   *   PeerFailedError when a worker refuses its shard.
   */
  static async start(model: ModelDescription, options: ClusterOptions): Promise<Cluster> {
    const plan = planCluster(model, options.workers.length + 1, options.quantizedMatmul)
    const source = new ModelWeights(model)
    let node: TransportNode | null = null
    const links: WorkerLink[] = []
    let hub: StarAllreduceHub | null = null
    let writer: ShardFileWriter | null = null
    const tracer = options.trace ? new TraceRecorder() : undefined
    try {
      if (options.workers.length > 0) {
        node = new TransportNode({ listen: [] })
        await node.start()
        for (const [i, address] of options.workers.entries()) {
          const channel = await node.dial(address, TENSOR_PARALLEL_PROTOCOL, options.signal ? { signal: options.signal } : {})
          links.push({ index: i + 1, address, channel })
        }
      }
      // Layer by layer: read the layer's tensors once, cut every peer's share, send it, forget the layer. Neither
      // the whole model nor a whole shard needs to be in memory at once.
      await Promise.all(
        links.map((l) => l.channel.send({ type: 'plan', plan, shardIndex: l.index, threads: options.threads, ...(tracer ? { trace: true } : {}) })),
      )
      const budget = options.memoryBudgetBytes
      const shardDir = options.shardDir ?? defaultShardDir('master')
      if (budget !== undefined) writer = await ShardFileWriter.create(shardDir)
      const own: LayerShardWeights[] = Array.from({ length: plan.model.nLayers }, () => ({ attention: null, ffn: null }))
      const sent = links.map(() => 0)
      for (let layer = plan.layers.start; layer < plan.layers.start + plan.layers.count; layer++) {
        await Promise.all(
          links.map(async (link, i) => {
            for (const t of encodeLayerShard(sliceLayerShard(plan.model, plan.shards[link.index]!, layer, source))) {
              await link.channel.send({ type: 'tensor', layer, name: t.name, bits: t.bits, rows: t.rows, cols: t.cols }, t.body)
              sent[i]! += 1
            }
          }),
        )
        const mine = sliceLayerShard(plan.model, plan.shards[0]!, layer, source)
        if (writer) {
          for (const t of encodeLayerShard(mine)) await writer.add(layer, t.name, t.bits, t.rows, t.cols, t.body)
        } else {
          own[layer] = ownedLayerShard(mine)
        }
        source.clearLayer(layer)
        options.onLayerDistributed?.(layer, plan.model.nLayers)
      }
      await Promise.all(links.map((l, i) => l.channel.send({ type: 'load-done', tensors: sent[i]! })))
      let store: WeightStore | LayerShardWeights[] = own
      if (writer) {
        const total = await writer.finish()
        writer = null
        store = await openShard(shardDir, { budgetBytes: budget!, kvCacheBytes: kvCacheBytes(plan, 0) })
        log('master shard: %d bytes on disk', total)
      }
      const runner = await ShardRunner.create(plan, 0, store, { threads: options.threads, ...(writer === null && budget !== undefined ? { lowMemory: true } : {}) })
      const overheadBytes = memoryUsage().rssBytes
      await Promise.all(links.map((link) => awaitReady(link, options)))
      if (links.length > 0) hub = new StarAllreduceHub(links.map((l) => (tracer ? tracedLink(l.channel, tracer) : l.channel)))
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
            quantizedMatmul: plan.quantizedMatmul,
          },
          asConstants({
            output_norm: { data: source.vector('output_norm.weight'), dims: [model.config.dim] },
            ...linearFeeds('wcls', classifier),
          }),
        ),
        { threads: options.threads },
      )
      const cluster = new Cluster(model, plan, node, links, hub, runner, head, source)
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

  /** Peers in the plan, the master included. */
  get size(): number {
    return this.plan.shards.length
  }

  /** The master's tracer when started with `trace: true` (for spans such as tokens), else undefined. */
  get tracer(): Tracer | undefined {
    return this.#tracer
  }

  /** Positions in the KV cache. */
  get position(): number {
    return this.#runner.cachedLength
  }

  /** Starts a new sequence on every peer. */
  async reset(): Promise<void> {
    this.#throwIfFailed()
    this.#runner.reset()
    await Promise.all(this.#links.map((l) => this.#send(l, { type: 'reset' })))
  }

  /**
   * Feeds `tokens` at positions position..position+n-1 through every layer on every peer.
   * @param allLogits return logits for every fed position instead of only the last.
   * @returns logits [n or 1, vocab] f32.
   * @throws PeerFailedError naming the peer when a worker goes away or reports an error.
   */
  async forward(tokens: readonly number[], allLogits = false): Promise<Float32Array> {
    this.#throwIfFailed()
    const { dim, vocabSize } = this.model.config
    const x = new Float32Array(tokens.length * dim) // [seq, dim] f32
    const emb = this.#embedding
    for (const [i, token] of tokens.entries()) {
      if (!Number.isInteger(token) || token < 0 || token >= vocabSize) throw new RangeError(`token id ${token} is outside the vocabulary of ${vocabSize}`)
      if (emb.bits === 32) x.set(emb.data.subarray(token * dim, (token + 1) * dim), i * dim)
      else nbitsRowF32(emb, token, x.subarray(i * dim, (i + 1) * dim))
    }
    const pos0 = this.#runner.cachedLength
    const step = this.#step++
    const header = { type: 'forward', step, pos0, seq: tokens.length }
    const body = new Uint8Array(x.buffer, x.byteOffset, x.byteLength)
    const tracer = this.#tracer
    const sends = this.#links.map((l) => (tracer ? tracedLink(l.channel, tracer).send(header, body) : this.#send(l, header, body)))
    try {
      await Promise.all(sends)
      await this.#runner.forward(x, pos0, step, this.#hub ?? LOCAL_ALLREDUCE, this.counters.timings, tracer)
    } catch (err) {
      throw this.#failure ?? err
    }
    this.counters.allreduces += this.#links.length > 0 ? 2 * this.plan.layers.count : 0
    const rows = allLogits ? x : x.subarray(x.length - dim)
    const out = await this.#head.run({ x: { data: rows, dims: [rows.length / dim, dim] } })
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
      window: this.#runner.weights.window,
      ...memoryUsage(),
      overheadBytes: this.#overheadBytes,
    }
    return [master, ...workers]
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
    await this.#runner.release()
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

  /** Reads one worker's frames for the whole session: allreduce partials go to the hub, errors fail the cluster. */
  async #route(link: WorkerLink): Promise<void> {
    try {
      for await (const frame of link.channel) {
        if (this.#tracer) traceReceive(this.#tracer, frame.header, frame.body.byteLength, link.channel.remotePeer)
        if (frame.header.type === 'ar') {
          this.#hub?.deliver(link.index - 1, frame)
        } else if (frame.header.type === 'stats') {
          this.#reply(link, frame)
        } else if (frame.header.type === 'trace') {
          this.#reply(link, frame)
        } else if (frame.header.type === 'error') {
          throw new PeerFailedError(
            link.channel.remotePeer,
            `worker ${link.index} (${link.address}) failed: ${String(frame.header.message)}`,
          )
        } else {
          throw new PeerFailedError(link.channel.remotePeer, `worker ${link.index} (${link.address}) sent an unexpected ${String(frame.header.type)} frame`)
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
      this.#hub?.fail(link.index - 1, failure)
      this.#replies.get(link.index)?.reject(failure)
      this.#replies.delete(link.index)
    }
  }

  /** Sends a `type` request to one worker and waits for its reply frame of the same type. */
  #request(link: WorkerLink, type: 'stats' | 'trace'): Promise<Frame> {
    return new Promise<Frame>((resolve, reject) => {
      this.#replies.set(link.index, { type, resolve, reject })
      this.#send(link, { type }).catch(reject)
    })
  }

  #reply(link: WorkerLink, frame: Frame): void {
    const waiting = this.#replies.get(link.index)
    if (waiting?.type !== frame.header.type) throw new PeerFailedError(link.channel.remotePeer, `worker ${link.index} (${link.address}) sent an unrequested ${frame.header.type} frame`)
    this.#replies.delete(link.index)
    waiting.resolve(frame)
  }

}

/** The allreduce of a single-peer plan: the sum of one partial is itself. */
const LOCAL_ALLREDUCE = {
  allreduce: async (_tag: number, partial: Float32Array | null): Promise<Float32Array> => partial ?? new Float32Array(0),
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
function planConstraints(model: ModelDescription): TensorParallelOptions {
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
