/**
 * The tail side of split computing (`edgeshard split serve`): holds the whole model, cuts tails on request, and answers
 * bottleneck payloads with the model's outputs over `/edgeshard/split/1.0.0` (see split-protocol.ts).
 */
import { logger } from '@libp2p/logger'
import {
  type ElementType,
  isElementType,
  type Observation,
  type ObservedTensor,
} from '../../splitter/index.ts'
import {
  decodeBottleneck,
  encodeBottleneck,
  type FrameLink,
  type FramedChannel,
  ShapedChannel,
  SPLIT_PROTOCOL,
  TransportNode,
  type TransportNodeOptions,
} from '../../transport/index.ts'
import { SplitProtocolError } from '../errors.ts'
import type { TypedSession, TypedTensor } from '../runtime.ts'
import { feedsFrom, timeRuns } from './profile.ts'
import type { SplitModel } from './split-model.ts'
import { type HeadMessage, type ObservedSpec, parseHeadMessage } from './split-protocol.ts'

const log = logger('edgeshard:split')

/** Options of a {@link SplitTailServer}. */
export interface TailServerOptions {
  /** Multiaddrs to listen on, e.g. `/ip4/127.0.0.1/tcp/0`. */
  readonly listen: readonly string[]
  /** Called when a head peer's session ends; `error` is set when it failed. */
  readonly onSessionEnd?: (peer: string, error?: Error) => void
  /** Identity and membership of the server's node (trust set, pre-shared key). Default: a fresh key, anyone admitted. */
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
}

function observationOf(specs: readonly ObservedSpec[], batch: number): Observation {
  const tensors = new Map<string, ObservedTensor>()
  for (const s of specs) {
    if (!isElementType(s.type)) throw new SplitProtocolError(`cannot type crossing tensor ${s.name}: unknown element type ${s.type}`)
    tensors.set(s.name, { type: s.type as ElementType, dims: s.dims })
  }
  return { batch, tensors }
}

function errorName(err: unknown): string {
  return err instanceof Error ? err.name : 'Error'
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}

/**
 * A tail server: one model, any number of head peers, each with its own cuts (tail sessions live as long as the
 * head's stream). A bad frame ends that head's session with an `error` frame; other sessions go on.
 */
export class SplitTailServer {
  readonly #model: SplitModel
  readonly #node: TransportNode
  readonly #options: TailServerOptions

  constructor(model: SplitModel, options: TailServerOptions) {
    this.#model = model
    this.#options = options
    this.#node = new TransportNode({ listen: [...options.listen], ...options.transport })
  }

  /** Starts listening and handling the split protocol. */
  async start(options: { signal?: AbortSignal } = {}): Promise<void> {
    await this.#node.start(options)
    await this.#node.handle(SPLIT_PROTOCOL, (channel) => this.#serve(channel), options)
    log('serving %s (%d nodes) at %s', this.#model.path, this.#model.nodeCount, this.#node.multiaddrs().join(', '))
  }

  multiaddrs(): string[] {
    return this.#node.multiaddrs()
  }

  get peerId(): string {
    return this.#node.peerId
  }

  /** Closes every session and the node. */
  async stop(): Promise<void> {
    await this.#node.stop()
  }

  async #serve(channel: FramedChannel): Promise<void> {
    const peer = channel.remotePeer
    let link: FrameLink = channel
    const cuts = new Map<number, { crossing: string[]; tail: TypedSession }>()
    let failure: Error | undefined
    try {
      for (;;) {
        const frame = await channel.read()
        if (frame === null) break
        let message: HeadMessage
        try {
          message = parseHeadMessage(frame)
        } catch (err) {
          await link.send({ type: 'error', message: errorMessage(err), name: errorName(err) }).catch(() => {})
          throw err
        }
        if (message.type === 'bye') break
        if (message.type === 'hello') {
          if (message.model !== this.#model.sha256) {
            const err = new SplitProtocolError(
              `head peer ${peer} holds model ${message.model.slice(0, 12)}…, this server ${this.#model.path} (${this.#model.sha256.slice(0, 12)}…): both sides need the same file`,
            )
            await link.send({ type: 'error', message: err.message, name: err.name }).catch(() => {})
            throw err
          }
          if (message.link) link = new ShapedChannel(channel, message.link)
          await link.send({ type: 'hello', model: this.#model.sha256, nodes: this.#model.nodeCount })
          continue
        }
        try {
          await this.#answer(message, frame.body, link, cuts)
        } catch (err) {
          if (err instanceof Error && err.name === 'PeerGoneError') throw err
          log.error('request %s from %s failed - %e', message.type, peer, err)
          await link.send({ type: 'error', ...('id' in message ? { id: message.id } : {}), message: errorMessage(err), name: errorName(err) })
        }
      }
    } catch (err) {
      failure = err instanceof Error ? err : new Error(String(err))
    } finally {
      for (const c of cuts.values()) await c.tail.release().catch(() => {})
      await channel.close().catch(() => {})
      this.#options.onSessionEnd?.(peer, failure)
    }
  }

  async #answer(message: Exclude<HeadMessage, { type: 'hello' | 'bye' }>, body: Uint8Array, link: FrameLink, cuts: Map<number, { crossing: string[]; tail: TypedSession }>): Promise<void> {
    const model = this.#model
    switch (message.type) {
      case 'ping':
        await link.send({ type: 'pong', id: message.id })
        return
      case 'probe':
        await link.send({ type: 'probe', id: message.id })
        return
      case 'cut': {
        const t0 = performance.now()
        const cut = model.cut(message.crossing, observationOf(message.observed, message.batch))
        const tail = await model.session(`tail@${message.crossing.join('+')}`, cut.tail)
        await cuts.get(message.id)?.tail.release()
        cuts.set(message.id, { crossing: message.crossing, tail })
        await link.send({ type: 'cut', id: message.id, tailNodes: cut.tailNodes, loadMs: performance.now() - t0 })
        return
      }
      case 'infer': {
        const cut = cuts.get(message.cut)
        if (!cut) throw new SplitProtocolError(`infer ${message.id}: no cut ${message.cut} was set up on this stream`)
        const t0 = performance.now()
        const decoded = decodeBottleneck(body)
        if (decoded.length !== cut.crossing.length) {
          throw new SplitProtocolError(`infer ${message.id}: payload has ${decoded.length} tensors, cut ${message.cut} has ${cut.crossing.length} (${cut.crossing.join(', ')})`)
        }
        const t1 = performance.now()
        const outputs = await cut.tail.run(feedsFrom(cut.crossing, decoded))
        const t2 = performance.now()
        const reply = encodeBottleneck(
          model.outputs.map((o) => {
            const t = outputs[o.name]!
            return { type: t.type, dims: t.dims, data: t.data }
          }),
          { quantization: 'f32', compression: 'none' },
        )
        await link.send({ type: 'result', id: message.id, decodeMs: t1 - t0, tailMs: t2 - t1 }, reply)
        return
      }
      case 'profile': {
        const decoded = decodeBottleneck(body)
        if (decoded.length !== model.inputs.length) throw new SplitProtocolError(`profile ${message.id}: ${decoded.length} inputs, the model has ${model.inputs.length}`)
        const feeds: Record<string, TypedTensor> = feedsFrom(model.inputs.map((i) => i.name), decoded)
        const { values } = await model.probe(feeds)
        const observation = observationOf(message.observed, message.batch)
        const tailMs: number[] = []
        for (const c of message.cuts) {
          const cut = model.cut(c.crossing, observation)
          const tail = await model.session(`tail@${c.index}`, cut.tail)
          try {
            const crossing = Object.fromEntries(c.crossing.map((n) => [n, values[n]!]))
            tailMs.push(await timeRuns(message.repeats, () => tail.run(crossing)))
          } finally {
            await tail.release()
          }
        }
        const full = await model.fullSession()
        const fullMs = await timeRuns(message.repeats, () => full.run(feeds))
        await link.send({ type: 'profile', id: message.id, tailMs, fullMs })
        return
      }
    }
  }
}
