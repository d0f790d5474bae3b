import { logger } from '@libp2p/logger'
import {
  buildOutputHead,
  type LayerShardWeights,
  type ModelDescription,
  planTensorParallel,
  readTensorF32,
  sliceLayerShard,
  type TensorParallelPlan,
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
import { WEIGHT_NAMES } from './protocol.ts'
import { Session } from './runtime.ts'
import { type ForwardTimings, ShardRunner } from './shard-runner.ts'

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
  readonly counters: ClusterCounters = { allreduces: 0, timings: { computeMs: 0, allreduceMs: 0 } }
  readonly #node: TransportNode | null
  readonly #links: readonly WorkerLink[]
  readonly #hub: StarAllreduceHub | null
  readonly #runner: ShardRunner
  readonly #head: Session
  readonly #embedding: Float32Array // [vocab, dim] f32
  readonly #outputNorm: Float32Array // [dim] f32
  readonly #classifier: Float32Array // [vocab, dim] f32
  #step = 0
  #failure: Error | null = null
  #closing = false

  private constructor(
    model: ModelDescription,
    plan: TensorParallelPlan,
    node: TransportNode | null,
    links: readonly WorkerLink[],
    hub: StarAllreduceHub | null,
    runner: ShardRunner,
    head: Session,
  ) {
    this.model = model
    this.plan = plan
    this.#node = node
    this.#links = links
    this.#hub = hub
    this.#runner = runner
    this.#head = head
    this.#embedding = readTensorF32(model, 'token_embd.weight')
    this.#outputNorm = readTensorF32(model, 'output_norm.weight')
    this.#classifier = readTensorF32(model, 'output.weight')
  }

  /**
   * Plans the model over the master plus `options.workers`, dials every worker, sends plans and shards, and loads
   * the master's own shard.
   * @throws RangeError from the planner (before any socket opens); DialError naming an unreachable worker;
   *   PeerFailedError when a worker refuses its shard.
   */
  static async start(model: ModelDescription, options: ClusterOptions): Promise<Cluster> {
    const plan = planTensorParallel(model.config, options.workers.length + 1)
    const cache = new Map<string, Float32Array>()
    const tensor = (name: string): Float32Array => {
      let t = cache.get(name)
      if (!t) {
        t = readTensorF32(model, name)
        cache.set(name, t)
      }
      return t
    }
    const shardWeights = (index: number): LayerShardWeights[] =>
      Array.from({ length: plan.model.nLayers }, (_, layer) => sliceLayerShard(plan.model, plan.shards[index]!, layer, tensor))

    let node: TransportNode | null = null
    const links: WorkerLink[] = []
    let hub: StarAllreduceHub | null = null
    try {
      if (options.workers.length > 0) {
        node = new TransportNode({ listen: [] })
        await node.start()
        for (const [i, address] of options.workers.entries()) {
          const channel = await node.dial(address, TENSOR_PARALLEL_PROTOCOL, options.signal ? { signal: options.signal } : {})
          links.push({ index: i + 1, address, channel })
        }
        await Promise.all(links.map((link) => sendShard(link, plan, shardWeights(link.index), options)))
        hub = new StarAllreduceHub(links.map((l) => l.channel))
      }
      const runner = await ShardRunner.create(plan, 0, shardWeights(0), { threads: options.threads })
      const head = await Session.create(
        'output_head',
        buildOutputHead({ dim: model.config.dim, vocabSize: model.config.vocabSize, normEps: model.config.normEps }),
        { threads: options.threads },
      )
      const cluster = new Cluster(model, plan, node, links, hub, runner, head)
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
    for (const [i, token] of tokens.entries()) {
      if (!Number.isInteger(token) || token < 0 || token >= vocabSize) throw new RangeError(`token id ${token} is outside the vocabulary of ${vocabSize}`)
      x.set(this.#embedding.subarray(token * dim, (token + 1) * dim), i * dim)
    }
    const pos0 = this.#runner.cachedLength
    const step = this.#step++
    const header = { type: 'forward', step, pos0, seq: tokens.length }
    const sends = this.#links.map((l) => this.#send(l, header, new Uint8Array(x.buffer, x.byteOffset, x.byteLength)))
    try {
      await Promise.all(sends)
      await this.#runner.forward(x, pos0, step, this.#hub ?? LOCAL_ALLREDUCE, this.counters.timings)
    } catch (err) {
      throw this.#failure ?? err
    }
    this.counters.allreduces += this.#links.length > 0 ? 2 * this.plan.model.nLayers : 0
    const rows = allLogits ? x : x.subarray(x.length - dim)
    const out = await this.#head.run({
      x: { data: rows, dims: [rows.length / dim, dim] },
      output_norm: { data: this.#outputNorm, dims: [dim] },
      wcls: { data: this.#classifier, dims: [vocabSize, dim] },
    })
    return out.logits!.data as Float32Array
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
        if (frame.header.type === 'ar') {
          this.#hub?.deliver(link.index - 1, frame)
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
    }
  }

}

/** The allreduce of a single-peer plan: the sum of one partial is itself. */
const LOCAL_ALLREDUCE = {
  allreduce: async (_tag: number, partial: Float32Array | null): Promise<Float32Array> => partial ?? new Float32Array(0),
}

async function sendShard(link: WorkerLink, plan: TensorParallelPlan, weights: readonly LayerShardWeights[], options: ClusterOptions): Promise<void> {
  const { channel } = link
  await channel.send({ type: 'plan', plan, shardIndex: link.index, threads: options.threads })
  let count = 0
  for (const [layer, w] of weights.entries()) {
    const blocks: Record<string, Float32Array> = { ...(w.attention ?? {}), ...(w.ffn ?? {}) }
    for (const name of WEIGHT_NAMES) {
      const t = blocks[name]
      if (!t) continue
      await channel.send({ type: 'tensor', layer, name }, new Uint8Array(t.buffer, t.byteOffset, t.byteLength))
      count++
    }
  }
  await channel.send({ type: 'load-done', tensors: count })
  const reply = await firstFrame(channel)
  if (reply.header.type !== 'ready') {
    const why = reply.header.type === 'error' ? String(reply.header.message) : `unexpected ${String(reply.header.type)} frame`
    throw new PeerFailedError(channel.remotePeer, `worker ${link.index} (${link.address}) refused its shard: ${why}`)
  }
  options.onWorkerReady?.(link.index, channel.remotePeer)
}

async function firstFrame(channel: FramedChannel): Promise<Frame> {
  const it = channel[Symbol.asyncIterator]()
  const { value, done } = await it.next()
  if (done) throw new PeerGoneError(channel.remotePeer)
  return value
}
