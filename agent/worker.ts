import { logger } from '@libp2p/logger'
import type { LayerShardWeights, TensorParallelPlan } from '../splitter/index.ts'
import {
  f32Body,
  type FramedChannel,
  StarAllreduceMember,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
} from '../transport/index.ts'
import { parseMasterMessage, WEIGHT_NAMES, type WeightName } from './protocol.ts'
import { ShardRunner } from './shard-runner.ts'

const log = logger('edgeshard:agent:worker')

/** Options of a worker agent. */
export interface WorkerOptions {
  /** Multiaddrs to listen on, e.g. `/ip4/127.0.0.1/tcp/0`. */
  readonly listen: readonly string[]
  /** Called when a master's session ends (normally or not); `error` is set when it failed. */
  readonly onSessionEnd?: (peer: string, error?: Error) => void
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

  constructor(options: WorkerOptions) {
    this.#options = options
    this.#node = new TransportNode({ listen: [...options.listen] })
  }

  async start(): Promise<void> {
    await this.#node.start()
    await this.#node.handle(TENSOR_PARALLEL_PROTOCOL, (channel) => this.#serve(channel))
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
    const member = new StarAllreduceMember(channel)
    let plan: TensorParallelPlan | null = null
    let shardIndex = 0
    let threads = 1
    let layers: Partial<Record<WeightName, Float32Array>>[] = []
    let received = 0
    let runner: ShardRunner | null = null
    let work: Promise<void> = Promise.resolve()
    let failure: Error | undefined
    const fail = (err: Error): void => {
      if (failure) return
      failure = err
      log.error('session with %s failed: %s', peer, err.message)
      member.fail(err)
      void channel
        .send({ type: 'error', message: err.message })
        .catch(() => {})
        .finally(() => channel.close())
    }
    try {
      for await (const frame of channel) {
        if (failure) break
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
            layers = Array.from({ length: plan.model.nLayers }, () => ({}))
            received = 0
            break
          case 'tensor': {
            if (!plan) throw new RangeError('tensor frame before the plan')
            const layer = layers[msg.layer]
            if (!layer) throw new RangeError(`tensor for layer ${msg.layer}: the plan has ${plan.model.nLayers} layers`)
            layer[msg.name] = f32Body(frame)
            received++
            break
          }
          case 'load-done': {
            if (!plan) throw new RangeError('load-done before the plan')
            if (msg.tensors !== received) throw new RangeError(`load-done announces ${msg.tensors} tensors, received ${received}`)
            await runner?.release()
            runner = await ShardRunner.create(plan, shardIndex, layers.map(toLayerWeights), { threads })
            layers = []
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
            work = work.then(() => r.forward(x, msg.pos0, msg.step, member).then(() => {}))
            work.catch((err: unknown) => fail(err as Error))
            break
          }
          case 'reset': {
            const r = runner
            work = work.then(() => r?.reset())
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

function toLayerWeights(w: Partial<Record<WeightName, Float32Array>>, layer: number): LayerShardWeights {
  const has = (names: readonly WeightName[]): boolean => {
    const present = names.filter((n) => w[n] !== undefined).length
    if (present !== 0 && present !== names.length) {
      throw new RangeError(`layer ${layer}: incomplete weights, got ${names.filter((n) => w[n]).join(', ')}`)
    }
    return present === names.length
  }
  const attn = WEIGHT_NAMES.slice(0, 5)
  const ffn = WEIGHT_NAMES.slice(5)
  return {
    attention: has(attn) ? { attn_norm: w.attn_norm!, wq: w.wq!, wk: w.wk!, wv: w.wv!, wo: w.wo! } : null,
    ffn: has(ffn) ? { ffn_norm: w.ffn_norm!, w1: w.w1!, w3: w.w3!, w2: w.w2! } : null,
  }
}
