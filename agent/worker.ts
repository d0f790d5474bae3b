import { logger } from '@libp2p/logger'
import type { LayerShardWeights, LinearWeight, TensorParallelPlan } from '../splitter/index.ts'
import {
  type AllreduceLink,
  f32Body,
  type FramedChannel,
  StarAllreduceMember,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
} from '../transport/index.ts'
import { join } from 'node:path'
import { memoryUsage } from './memory.ts'
import { type MasterMessage, parseMasterMessage, tensorBodyBytes, VECTOR_NAMES, type WeightName, type WorkerStats } from './protocol.ts'
import { defaultShardDir, kvCacheBytes } from './shard-encoding.ts'
import { deviceProfile, serveInfo } from './peer-info.ts'
import { type ForwardTimings, ShardRunner } from './shard-runner.ts'
import { TraceRecorder, traceReceive, tracedLink, wallClockMs } from './trace.ts'
import { openShard, ShardFileWriter } from './weight-store.ts'

const log = logger('edgeshard:agent:worker')

/** Options of a worker agent. */
export interface WorkerOptions {
  /** Multiaddrs to listen on, e.g. `/ip4/127.0.0.1/tcp/0`. */
  readonly listen: readonly string[]
  /** Called when a master's session ends (normally or not); `error` is set when it failed. */
  readonly onSessionEnd?: (peer: string, error?: Error) => void
  /**
   * Bytes for this agent's weights and KV cache. A shard larger than that is stored on local disk and streamed
   * through a sliding window of half-layer blocks (TPI-LLM §3.3). Default: all resident.
   */
  readonly memoryBudgetBytes?: number
  /** Where shard files go in sliding-window mode (default: a folder under the OS temp dir). */
  readonly shardDir?: string
  /** Announce this agent on the LAN by mDNS so masters and `edgeshard peers` find it. Default false. */
  readonly mdns?: boolean
}

/**
 * A worker agent: listens for masters on the tensor-parallel protocol, receives a plan and its shard of the weights,
 * and executes forward passes in lockstep with the master (star allreduce with the master as hub). One master at a
 * time is served per stream; a malformed frame ends that master's session with an `error` frame and the agent keeps
 * listening.
 */
export class WorkerAgent {
  readonly #node: TransportNode
  readonly #options: WorkerOptions
  /** Masters being served now. */
  #sessions = 0

  constructor(options: WorkerOptions) {
    this.#options = options
    this.#node = new TransportNode({ listen: [...options.listen], ...(options.mdns ? { mdns: { announce: true } } : {}) })
  }

  async start(): Promise<void> {
    await this.#node.start()
    await this.#node.handle(TENSOR_PARALLEL_PROTOCOL, async (channel) => {
      this.#sessions++
      try {
        await this.#serve(channel)
      } finally {
        this.#sessions--
      }
    })
    await serveInfo(this.#node, () => deviceProfile(this.#sessions > 0))
  }

  /** Full multiaddrs (with `/p2p/<peer id>`) masters can dial. */
  multiaddrs(): string[] {
    return this.#node.multiaddrs()
  }

  get peerId(): string {
    return this.#node.peerId
  }

  async stop(): Promise<void> {
    await this.#node.stop()
  }

  async #serve(channel: FramedChannel): Promise<void> {
    const peer = channel.remotePeer
    log('master %s connected', peer)
    // Tracing (the plan says so): allreduce sends go through a traced link; otherwise straight to the channel.
    let tracer: TraceRecorder | undefined
    let hubLink: AllreduceLink = channel
    const member = new StarAllreduceMember({ peer: channel.peer, send: (header, body) => hubLink.send(header, body) })
    let plan: TensorParallelPlan | null = null
    let shardIndex = 0
    let threads = 1
    let layers: Partial<Record<WeightName, LinearWeight>>[] = []
    let received = 0
    let runner: ShardRunner | null = null
    let writer: ShardFileWriter | null = null
    let shardDir = ''
    let overheadBytes = 0
    let forwards = 0
    const timings: ForwardTimings = { computeMs: 0, allreduceMs: 0, ioWaitMs: 0 }
    let work: Promise<void> = Promise.resolve()
    let failure: Error | undefined
    const fail = (err: Error): void => {
      if (failure) return
      failure = err
      log.error('session with %s failed: %s', peer, err.message)
      member.fail(err)
      void channel
        .send({ type: 'error', message: err.message, errorName: err.name })
        .catch(() => {})
        .finally(() => channel.close())
    }
    try {
      for await (const frame of channel) {
        if (failure) break
        if (tracer) traceReceive(tracer, frame.header, frame.body.byteLength, peer)
        if (frame.header.type === 'ar') {
          member.deliver(frame)
          continue
        }
        const msg = parseMasterMessage(frame.header)
        switch (msg.type) {
          case 'plan':
            plan = msg.plan
            shardIndex = msg.shardIndex
            threads = msg.threads
            tracer = msg.trace ? new TraceRecorder() : undefined
            hubLink = tracer ? tracedLink(channel, tracer) : channel
            layers = Array.from({ length: plan.model.nLayers }, () => ({}))
            received = 0
            if (this.#options.memoryBudgetBytes !== undefined) {
              shardDir = join(this.#options.shardDir ?? defaultShardDir('worker'), `shard-${shardIndex}`)
              writer = await ShardFileWriter.create(shardDir)
            }
            break
          case 'tensor': {
            if (!plan) throw new RangeError('tensor frame before the plan')
            const layer = layers[msg.layer]
            const { start, count } = plan.layers
            if (!layer || msg.layer < start || msg.layer >= start + count) {
              throw new RangeError(`tensor for layer ${msg.layer}: the plan runs layers ${start}..${start + count}`)
            }
            if (writer) {
              const expected = tensorBodyBytes(msg.bits, msg.rows, msg.cols)
              if (frame.body.byteLength !== expected) throw new RangeError(`tensor ${msg.name}: ${frame.body.byteLength} bytes, expected ${expected}`)
              await writer.add(msg.layer, msg.name, msg.bits, msg.rows, msg.cols, frame.body)
            } else {
              layer[msg.name] = receivedWeight(msg, frame.body)
            }
            received++
            break
          }
          case 'load-done': {
            if (!plan) throw new RangeError('load-done before the plan')
            if (msg.tensors !== received) throw new RangeError(`load-done announces ${msg.tensors} tensors, received ${received}`)
            await runner?.release()
            if (writer) {
              await writer.finish()
              writer = null
              const store = await openShard(shardDir, { budgetBytes: this.#options.memoryBudgetBytes!, kvCacheBytes: kvCacheBytes(plan, shardIndex) })
              runner = await ShardRunner.create(plan, shardIndex, store, { threads, lowMemory: true })
            } else {
              runner = await ShardRunner.create(plan, shardIndex, layers.map(toLayerWeights), { threads })
            }
            layers = []
            overheadBytes = memoryUsage().rssBytes
            await channel.send({ type: 'ready', shardIndex })
            log('shard %d ready for %s', shardIndex, peer)
            break
          }
          case 'forward': {
            const r = runner
            if (!r) throw new RangeError('forward before the shard was loaded')
            const x = f32Body(frame)
            if (x.length !== msg.seq * r.plan.model.dim) {
              throw new RangeError(`forward of ${msg.seq} positions needs ${msg.seq * r.plan.model.dim} values, got ${x.length}`)
            }
            work = work.then(() =>
              r.forward(x, msg.pos0, msg.step, member, timings, tracer).then(() => {
                forwards++
              }),
            )
            work.catch((err: unknown) => fail(err as Error))
            break
          }
          case 'reset': {
            const r = runner
            work = work.then(() => r?.reset())
            break
          }
          case 'stats': {
            await work.catch(() => {})
            const stats: WorkerStats = {
              forwards,
              ...timings,
              window: runner?.weights.window ?? 0,
              ...memoryUsage(),
              overheadBytes,
            }
            await channel.send({ type: 'stats', ...stats })
            break
          }
          case 'trace': {
            const receivedMs = wallClockMs()
            await work.catch(() => {})
            const recorded = tracer?.take() ?? { timeOriginMs: performance.timeOrigin, spans: [] }
            const body = new TextEncoder().encode(JSON.stringify(recorded.spans))
            await channel.send({ type: 'trace', timeOriginMs: recorded.timeOriginMs, receivedMs, sentMs: wallClockMs() }, body)
            break
          }
          case 'bye':
            await work.catch(() => {})
            await channel.close()
            break
        }
      }
    } catch (err) {
      fail(err as Error)
    } finally {
      member.fail(failure ?? new Error(`master ${peer} ended the session`))
      await work.catch(() => {})
      await runner?.release()
      log('master %s disconnected', peer)
      this.#options.onSessionEnd?.(peer, failure)
    }
  }
}

/**
 * A weight from a `tensor` frame body (layout in protocol.ts), as views on the body.
 * @throws RangeError when the body size does not match the header.
 */
function receivedWeight(msg: Extract<MasterMessage, { type: 'tensor' }>, body: Uint8Array): LinearWeight {
  const { bits, rows, cols, name } = msg
  const expected = tensorBodyBytes(bits, rows, cols)
  if (body.byteLength !== expected) throw new RangeError(`tensor ${name}: ${body.byteLength} bytes, ${rows}×${cols} at ${bits} bits needs ${expected}`)
  if (bits === 32) return { bits, rows, cols, data: new Float32Array(body.buffer, body.byteOffset, rows * cols) }
  if (VECTOR_NAMES.has(name)) throw new RangeError(`tensor ${name}: vectors are sent as f32, got ${bits} bits`)
  const blobBytes = (rows * cols * bits) / 8
  // The frame body is 8-byte aligned and the blob length is a multiple of 4 (cols is a multiple of 32).
  return {
    bits,
    rows,
    cols,
    blob: body.subarray(0, blobBytes),
    scales: new Float32Array(body.buffer, body.byteOffset + blobBytes, (rows * cols) / 32),
  }
}

function toLayerWeights(w: Partial<Record<WeightName, LinearWeight>>, layer: number): LayerShardWeights {
  const has = (names: readonly WeightName[]): boolean => {
    const present = names.filter((n) => w[n] !== undefined).length
    if (present !== 0 && present !== names.length) {
      throw new RangeError(`layer ${layer}: incomplete weights, got ${names.filter((n) => w[n]).join(', ')}`)
    }
    return present === names.length
  }
  const vec = (n: WeightName): Float32Array => {
    const t = w[n]!
    if (t.bits !== 32) throw new RangeError(`layer ${layer}: ${n} must be f32`)
    return t.data
  }
  const attention = has(['attn_norm', 'wq', 'wk', 'wv', 'wo'])
    ? {
        attn_norm: vec('attn_norm'),
        wq: w.wq!,
        wk: w.wk!,
        wv: w.wv!,
        wo: w.wo!,
        bias: has(['bq', 'bk', 'bv']) ? { bq: vec('bq'), bk: vec('bk'), bv: vec('bv') } : null,
      }
    : null
  const ffn = has(['ffn_norm', 'w1', 'w3', 'w2']) ? { ffn_norm: vec('ffn_norm'), w1: w.w1!, w3: w.w3!, w2: w.w2! } : null
  return { attention, ffn }
}
