/**
 * The head side of split computing (`edgeshard split run`): runs the head of the model on this device, encodes the
 * crossing tensors, sends them to a tail server over `/edgeshard/split/1.0.0` and returns the outputs it answers.
 * Also measures the link (round trip, throughput) and asks the server to time its tails, for the planner.
 */
import { logger } from '@libp2p/logger'
import type { CutCandidate, LinkProfile, Observation } from '../../splitter/index.ts'
import {
  type BottleneckCodec,
  codecName,
  decodeBottleneck,
  encodeBottleneck,
  type FrameLink,
  type FramedChannel,
  type LinkEmulation,
  ShapedChannel,
  SPLIT_PROTOCOL,
  TransportNode,
  type TransportNodeOptions,
} from '../../transport/index.ts'
import { SplitProtocolError } from '../errors.ts'
import type { TypedSession, TypedTensor } from '../runtime.ts'
import { feedsFrom } from './profile.ts'
import type { SplitModel } from './split-model.ts'
import { type ObservedSpec, parseTailMessage, type TailMessage } from './split-protocol.ts'

const log = logger('edgeshard:split')

/** Options of {@link SplitHeadClient.connect}. */
export interface HeadClientOptions {
  /** Emulate this link on both directions (userspace delay + rate, see transport/link-shaper.ts). */
  readonly link?: LinkEmulation
  readonly signal?: AbortSignal
  /** Identity and membership of the head's node (a tail with a trust file admits members only). Default: a fresh key. */
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
}

/** Timings and bytes of one request, ms and bytes. */
export interface RequestTiming {
  readonly headMs: number
  readonly encodeMs: number
  readonly requestBytes: number
  readonly replyBytes: number
  /** From sending the request to receiving the reply. */
  readonly roundTripMs: number
  /** Decode + tail on the server, as it reported. */
  readonly serverMs: number
  readonly totalMs: number
}

/** What {@link SplitHeadClient.infer} returns. */
export interface InferResult {
  /** The model's outputs by name. */
  readonly outputs: Record<string, TypedTensor>
  readonly timing: RequestTiming
}

/** The cut a head client uses: a candidate (local-only runs the whole model here) and the codec. */
export interface ActiveCut {
  readonly candidate: CutCandidate
  readonly codec: BottleneckCodec
}

function observedSpecs(observation: Observation, names: readonly string[]): ObservedSpec[] {
  return names.flatMap((name) => {
    const t = observation.tensors.get(name)
    return t ? [{ name, type: t.type, dims: [...t.dims] }] : []
  })
}

/**
 * A head peer connected to one tail server. Single user: one request at a time.
 */
export class SplitHeadClient {
  readonly #model: SplitModel
  readonly #node: TransportNode
  readonly #channel: FramedChannel
  readonly #link: FrameLink
  #nextId = 1
  #active: { cut: ActiveCut; serverCut: number | undefined; head: TypedSession | undefined; crossing: readonly string[] } | undefined

  private constructor(model: SplitModel, node: TransportNode, channel: FramedChannel, link: FrameLink) {
    this.#model = model
    this.#node = node
    this.#channel = channel
    this.#link = link
  }

  /**
   * Dials the tail server at `address` and checks it holds the same model (sha256).
   * @throws DialError when unreachable; SplitProtocolError when the server holds another model or answers badly
   */
  static async connect(model: SplitModel, address: string, options: HeadClientOptions = {}): Promise<SplitHeadClient> {
    const node = new TransportNode({ ...options.transport })
    await node.start()
    try {
      const channel = await node.dial(address, SPLIT_PROTOCOL, options.signal ? { signal: options.signal } : {})
      const link: FrameLink = options.link ? new ShapedChannel(channel, options.link) : channel
      const client = new SplitHeadClient(model, node, channel, link)
      await link.send({ type: 'hello', model: model.sha256, ...(options.link ? { link: options.link } : {}) }, null, options.signal ? { signal: options.signal } : {})
      const reply = await client.#expect('hello', undefined, options.signal)
      log('connected to %s (%s, %d nodes)', address, reply.model.slice(0, 12), reply.nodes)
      return client
    } catch (err) {
      await node.stop()
      throw err
    }
  }

  /** Peer id of the server. */
  get server(): string {
    return this.#channel.remotePeer
  }

  /** Bytes this client's channel has sent and received on the wire (frames, before encryption). */
  get wireBytes(): { sent: number; received: number } {
    return { sent: this.#channel.bytesSent, received: this.#channel.bytesReceived }
  }

  get activeCut(): ActiveCut | undefined {
    return this.#active?.cut
  }

  async #expect<T extends TailMessage['type']>(type: T, id: number | undefined, signal?: AbortSignal): Promise<Extract<TailMessage, { type: T }> & { body: Uint8Array }> {
    const frame = await this.#link.read(signal ? { signal } : {})
    if (frame === null) throw new SplitProtocolError(`tail server ${this.server} closed the stream while a ${type} reply was due`)
    const message = parseTailMessage(frame)
    if (message.type === 'error') {
      throw new SplitProtocolError(`tail server ${this.server} failed: ${message.message}`, { remoteName: message.name })
    }
    if (message.type !== type || (id !== undefined && 'id' in message && message.id !== id)) {
      throw new SplitProtocolError(`tail server ${this.server} sent ${message.type}${'id' in message ? ` ${message.id}` : ''} while ${type}${id === undefined ? '' : ` ${id}`} was due`)
    }
    return { ...(message as Extract<TailMessage, { type: T }>), body: frame.body }
  }

  /**
   * Uses `cut` from now on: builds the head here and has the server build the tail (not for local-only).
   * @param observation - types and shapes of the crossing tensors from a probing run (for untyped models)
   */
  async setCut(cut: ActiveCut, observation: Observation, options: { signal?: AbortSignal } = {}): Promise<void> {
    const previous = this.#active
    const { candidate } = cut
    let head: TypedSession | undefined
    let serverCut: number | undefined
    if (candidate.kind === 'local') {
      head = await this.#model.fullSession()
    } else {
      const modelCut = this.#model.cut(candidate.crossing, observation)
      head = await this.#model.session(`head@${candidate.index}`, modelCut.head, options)
      serverCut = this.#nextId++
      try {
        await this.#link.send(
          { type: 'cut', id: serverCut, crossing: [...candidate.crossing], observed: observedSpecs(observation, candidate.crossing), batch: observation.batch },
          null,
          options,
        )
        await this.#expect('cut', serverCut, options.signal)
      } catch (err) {
        await head.release()
        throw err
      }
    }
    this.#active = { cut, serverCut, head, crossing: candidate.crossing }
    if (previous?.head && previous.cut.candidate.kind !== 'local') await previous.head.release()
    log('cut set to #%d (%s) with %s', candidate.index, candidate.crossing.join(', '), codecName(cut.codec))
  }

  /**
   * Runs one request (`feeds` hold every model input, batch along dimension 0) through the active cut.
   * @throws SplitProtocolError when no cut is set or the server fails; PeerGoneError when it went away
   */
  async infer(feeds: Readonly<Record<string, TypedTensor>>, options: { signal?: AbortSignal } = {}): Promise<InferResult> {
    const active = this.#active
    if (!active?.head) throw new SplitProtocolError('cannot infer: no cut set (call setCut first)')
    const t0 = performance.now()
    if (active.cut.candidate.kind === 'local') {
      const outputs = await active.head.run(feeds, options)
      const ms = performance.now() - t0
      return { outputs, timing: { headMs: ms, encodeMs: 0, requestBytes: 0, replyBytes: 0, roundTripMs: 0, serverMs: 0, totalMs: ms } }
    }
    const headFeeds = Object.fromEntries(active.head.inputNames.map((n) => [n, feeds[n]!]))
    const headOut = active.head.inputNames.length === 0 ? {} : await active.head.run(headFeeds, options)
    const values = { ...feeds, ...headOut }
    const t1 = performance.now()
    const payload = encodeBottleneck(
      active.crossing.map((n) => {
        const t = values[n]
        if (!t) throw new SplitProtocolError(`cannot encode crossing tensor ${n}: the head did not produce it`)
        return { type: t.type, dims: t.dims, data: t.data }
      }),
      active.cut.codec,
    )
    const t2 = performance.now()
    const id = this.#nextId++
    await this.#link.send({ type: 'infer', id, cut: active.serverCut! }, payload, options)
    const reply = await this.#expect('result', id, options.signal)
    const t3 = performance.now()
    const decoded = decodeBottleneck(reply.body)
    const outputs = feedsFrom(
      this.#model.outputs.map((o) => o.name),
      decoded,
    )
    const t4 = performance.now()
    return {
      outputs,
      timing: {
        headMs: t1 - t0,
        encodeMs: t2 - t1,
        requestBytes: payload.byteLength,
        replyBytes: reply.body.byteLength,
        roundTripMs: t3 - t2,
        serverMs: reply.decodeMs + reply.tailMs,
        totalMs: t4 - t0,
      },
    }
  }

  /**
   * Measures the link: median round trip of `pings` empty frames, then throughput from probes of growing size until
   * one takes at least 20 ms beyond the round trip (or reaches `maxProbeBytes`).
   */
  async measureLink(options: { pings?: number; maxProbeBytes?: number; signal?: AbortSignal } = {}): Promise<LinkProfile> {
    const rtts: number[] = []
    for (let i = 0; i < (options.pings ?? 5); i++) {
      const id = this.#nextId++
      const t0 = performance.now()
      await this.#link.send({ type: 'ping', id }, null, options)
      await this.#expect('pong', id, options.signal)
      rtts.push(performance.now() - t0)
    }
    rtts.sort((a, b) => a - b)
    const rttMs = rtts[(rtts.length - 1) >> 1]!
    let size = 16 * 1024
    const maxBytes = options.maxProbeBytes ?? 8 * 1024 * 1024
    let bitsPerSecond = 0
    for (;;) {
      const id = this.#nextId++
      const filler = new Uint8Array(size)
      const t0 = performance.now()
      await this.#link.send({ type: 'probe', id }, filler, options)
      await this.#expect('probe', id, options.signal)
      const busyMs = Math.max(performance.now() - t0 - rttMs, 0.05)
      bitsPerSecond = (size * 8 * 1000) / busyMs
      if (busyMs >= 20 || size >= maxBytes) break
      size = Math.min(maxBytes, size * 4)
    }
    log('link to %s: rtt %s ms, %s Mbit/s', this.server, rttMs.toFixed(2), (bitsPerSecond / 1e6).toFixed(2))
    return { rttMs, bitsPerSecond }
  }

  /**
   * Has the server time the tails of `cuts` on `request` (inputs at the request batch), median of `repeats` runs.
   * @returns tail ms by candidate index, and the whole model's time on the server
   */
  async profileServer(
    cuts: readonly CutCandidate[],
    request: Readonly<Record<string, TypedTensor>>,
    observation: Observation,
    options: { repeats?: number; signal?: AbortSignal } = {},
  ): Promise<{ tailMs: Map<number, number>; fullMs: number }> {
    const id = this.#nextId++
    const offloadable = cuts.filter((c) => c.kind !== 'local')
    const inputs = encodeBottleneck(
      this.#model.inputs.map((i) => {
        const t = request[i.name]!
        return { type: t.type, dims: t.dims, data: t.data }
      }),
      { quantization: 'f32', compression: 'none' },
    )
    const allCrossing = [...new Set(offloadable.flatMap((c) => c.crossing))]
    await this.#link.send(
      {
        type: 'profile',
        id,
        cuts: offloadable.map((c) => ({ index: c.index, crossing: [...c.crossing] })),
        observed: observedSpecs(observation, allCrossing),
        batch: observation.batch,
        repeats: options.repeats ?? 9,
      },
      inputs,
      options,
    )
    const reply = await this.#expect('profile', id, options.signal)
    if (reply.tailMs.length !== offloadable.length) {
      throw new SplitProtocolError(`tail server ${this.server} profiled ${reply.tailMs.length} tails of ${offloadable.length}`)
    }
    return { tailMs: new Map(offloadable.map((c, i) => [c.index, reply.tailMs[i]!])), fullMs: reply.fullMs }
  }

  /** Says bye, closes the stream and the node, releases the head session. */
  async close(): Promise<void> {
    const active = this.#active
    this.#active = undefined
    await this.#link.send({ type: 'bye' }).catch(() => {})
    await this.#link.close().catch(() => {})
    if (active?.head && active.cut.candidate.kind !== 'local') await active.head.release().catch(() => {})
    await this.#node.stop()
  }
}
