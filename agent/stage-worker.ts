/**
 * A worker's part in a stage without the master (pipeline and hybrid plans, see protocol.ts and cluster.ts).
 *
 * The stage's leader (its shard 0) is the stage's allreduce hub: the master sends it `stage` with its members'
 * addresses, it dials each on the stage protocol (`/edgeshard/stage/1.0.0`) and sends `stage-join` { stageId,
 * shardIndex }; the member answers `joined`. Per forward pass the leader relays the master's `forward` (body [seq, dim]
 * f32) to its members, every peer of the stage runs its shard of the stage's layers with a star allreduce around the
 * leader (`ar` frames on the stage streams), and the leader sends the result to the master as `stage-out`. `reset`
 * is relayed the same way; `bye` ends a member's stage stream.
 *
 * stage protocol, leader → member: `stage-join`, `forward`, `reset`, `ar` (sums), `bye`;
 * member → leader: `joined`, `ar` (partial sums), `error`.
 */
import { logger } from '@libp2p/logger'
import {
  type Allreduce,
  f32Body,
  type FramedChannel,
  PeerGoneError,
  STAGE_PROTOCOL,
  StarAllreduceHub,
  StarAllreduceMember,
  type TransportNode,
  type WireDtype,
} from '../transport/index.ts'
import { PeerFailedError } from './errors.ts'
import { type DeadlineModelShape, stepDeadlineMs } from './peer-deadline.ts'
import { ProtocolError, type StageMemberAddress } from './protocol.ts'
import { type TraceRecorder, traceReceive, tracedLink } from './trace.ts'

const log = logger('edgeshard:agent:stage')

/** How long a member waits for the leader's `stage-join`, and the leader for `joined`, ms. */
const JOIN_TIMEOUT_MS = 10_000

/** The allreduce of a stage with one device: the sum of one partial is itself. */
export const LOCAL_ALLREDUCE: Allreduce = {
  allreduce: async (_tag: number, partial: Float32Array | null): Promise<Float32Array> => partial ?? new Float32Array(0),
}

/** A forward pass as the master (or the leader) announces it. */
export interface ForwardHeader {
  readonly step: number
  readonly pos0: number
  readonly seq: number
}

/** Messages a member receives from its leader (besides `ar`). */
export type LeaderMessage =
  | { type: 'stage-join'; stageId: string; shardIndex: number }
  | ({ type: 'forward' } & ForwardHeader)
  | { type: 'reset' }
  | { type: 'bye' }

function int(h: Record<string, unknown>, key: string, min = 0): number {
  const v = h[key]
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
    throw new ProtocolError(`stage frame ${String(h.type)}: field ${key} must be an integer ≥ ${min}, got ${JSON.stringify(v)}`)
  }
  return v
}

/** Checks a header a member received from its leader. @throws ProtocolError naming the type and field */
export function parseLeaderMessage(h: Record<string, unknown>): LeaderMessage {
  switch (h.type) {
    case 'stage-join':
      if (typeof h.stageId !== 'string' || h.stageId.length > 64) throw new ProtocolError('stage frame stage-join: stageId must be a string')
      return { type: 'stage-join', stageId: h.stageId, shardIndex: int(h, 'shardIndex', 1) }
    case 'forward':
      return { type: 'forward', step: int(h, 'step'), pos0: int(h, 'pos0'), seq: int(h, 'seq', 1) }
    case 'reset':
      return { type: 'reset' }
    case 'bye':
      return { type: 'bye' }
    default:
      throw new ProtocolError(`unexpected frame type ${JSON.stringify(h.type)} from the stage leader`)
  }
}

/** Options of a {@link StageLeader}. */
export interface StageLeaderOptions {
  /** Base deadline for the members' allreduce partials, ms (see peer-deadline.ts). Default: none. */
  readonly peerDeadlineMs?: number
  /** The plan's model shape (the deadline grows with a pass's arithmetic). */
  readonly model?: DeadlineModelShape
  /** Element type of the sums the leader sends its members (the plan's wire dtype). Default f32. */
  readonly wireDtype?: WireDtype
}

/** Options of a {@link StageMember}. */
export interface StageMemberOptions {
  /** Element type of the partials the member sends its leader (the plan's wire dtype). Default f32. */
  readonly wireDtype?: WireDtype
}

/** What a worker's session lends its stage role. */
export interface StageSession {
  readonly node: TransportNode
  /** The stream to the master (the leader sends `stage-out` on it). */
  readonly master: FramedChannel
  readonly tracer: TraceRecorder | undefined
  /** Queues a forward pass of the session's shard with the role's allreduce (a member: relayed by the leader). */
  queueForward(header: ForwardHeader, x: Float32Array): void
  /** Queues a reset of the KV cache. */
  queueReset(): void
  /** Ends the session with `err` (reported to the master). */
  fail(err: Error): void
}

/** A worker's role in a stage: the allreduce it uses and what it adds around each forward pass. */
export interface StageRole {
  readonly allreduce: Allreduce
  /** Before computing: the leader relays the pass to its members. */
  beforeForward(header: ForwardHeader, x: Float32Array): Promise<void>
  /** After computing: the leader sends the stage's output to the master. */
  afterForward(header: ForwardHeader, x: Float32Array): Promise<void>
  /** On a reset from the master: the leader relays it. */
  reset(): Promise<void>
  /** Ends the role's streams; `err` = abort them (the session failed), else close gracefully. */
  close(err?: Error): Promise<void>
}

/**
 * The leader of a stage: dials its members, is their allreduce hub, relays forward passes and resets, returns the
 * stage's output to the master.
 */
export class StageLeader implements StageRole {
  readonly #session: StageSession
  readonly #stageId: string
  readonly #deadline: { readonly baseMs: number; readonly model: DeadlineModelShape } | null
  readonly #wireDtype: WireDtype
  #members: { channel: FramedChannel; address: string }[] = []
  #hub: StarAllreduceHub | null = null
  /** The allreduce of the pass in flight: the hub with that pass's deadline. */
  #allreduce: Allreduce = LOCAL_ALLREDUCE
  #closing = false

  /**
   * @param options.peerDeadlineMs - base deadline for the members' partials, ms, scaled per pass by its positions
   *   (see peer-deadline.ts; needs `model`); absent: the leader waits as long as its members' streams are open
   * @param options.wireDtype - element type of the sums sent to the members (default f32)
   */
  constructor(session: StageSession, stageId: string, options: StageLeaderOptions = {}) {
    this.#session = session
    this.#stageId = stageId
    this.#deadline = options.peerDeadlineMs !== undefined && options.model ? { baseMs: options.peerDeadlineMs, model: options.model } : null
    this.#wireDtype = options.wireDtype ?? 'f32'
  }

  get allreduce(): Allreduce {
    return this.#allreduce
  }

  /**
   * Dials every member on the stage protocol and waits for each to join.
   * @throws DialError naming an unreachable member; PeerFailedError naming a member that refused to join
   */
  async connect(members: readonly StageMemberAddress[], signal?: AbortSignal): Promise<void> {
    if (this.#members.length > 0) throw new ProtocolError('frame stage: the stage is already connected')
    const { node, tracer } = this.#session
    const joined = await Promise.allSettled(
      members.map(async (m) => {
        const channel = await node.dial(m.address, STAGE_PROTOCOL, signal ? { signal } : {})
        try {
          await channel.send({ type: 'stage-join', stageId: this.#stageId, shardIndex: m.shardIndex })
          const reply = await channel.read({ signal: signal ? AbortSignal.any([signal, AbortSignal.timeout(JOIN_TIMEOUT_MS)]) : AbortSignal.timeout(JOIN_TIMEOUT_MS) })
          if (reply?.header.type !== 'joined') {
            const why = reply === null ? 'closed the stream' : reply.header.type === 'error' ? String(reply.header.message) : `sent ${String(reply.header.type)}`
            throw new PeerFailedError(channel.remotePeer, `stage member ${m.shardIndex} (${m.address}) did not join: ${why}`)
          }
        } catch (err) {
          channel.abort(err as Error)
          throw err
        }
        return { channel, address: m.address }
      }),
    )
    const failed = joined.find((r) => r.status === 'rejected')
    const ok = joined.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []))
    if (failed) {
      for (const m of ok) m.channel.abort(new Error('another member of the stage failed to join'))
      throw failed.reason
    }
    this.#members = ok
    if (ok.length > 0) {
      this.#hub = new StarAllreduceHub(ok.map((m) => (tracer ? tracedLink(m.channel, tracer) : m.channel)), {
        wireDtype: this.#wireDtype,
        ...(this.#deadline ? { deadlineMs: this.#deadline.baseMs } : {}),
      })
      this.#allreduce = this.#hub
    }
    for (const [i, m] of ok.entries()) void this.#route(i, m.channel, m.address)
    log('stage %s: %d members joined', this.#stageId, ok.length)
  }

  async beforeForward(header: ForwardHeader, x: Float32Array): Promise<void> {
    const hub = this.#hub
    const deadline = this.#deadline
    if (hub && deadline) {
      // A silent member fails the pass with PeerStalledError naming it, after a deadline that grows with the pass.
      const deadlineMs = stepDeadlineMs(deadline.baseMs, deadline.model, header.seq, header.pos0 + header.seq)
      this.#allreduce = { allreduce: (tag, partial, opts = {}) => hub.allreduce(tag, partial, { deadlineMs, ...opts }) }
    }
    const frame = { type: 'forward', step: header.step, pos0: header.pos0, seq: header.seq }
    await Promise.all(this.#links().map((l) => l.send(frame, x)))
  }

  async afterForward(header: ForwardHeader, x: Float32Array): Promise<void> {
    const { master, tracer } = this.#session
    await (tracer ? tracedLink(master, tracer) : master).send({ type: 'stage-out', step: header.step, seq: header.seq }, x)
  }

  async reset(): Promise<void> {
    await Promise.all(this.#members.map((m) => m.channel.send({ type: 'reset' })))
  }

  async close(err?: Error): Promise<void> {
    this.#closing = true
    // A pass waiting for its members' partials ends with `err` (the members' streams end without failing the hub).
    if (err && this.#members.length > 0) this.#hub?.fail(0, err)
    await Promise.all(
      this.#members.map(async (m) => {
        if (err) {
          m.channel.abort(err)
          return
        }
        await m.channel.send({ type: 'bye' }).catch(() => {})
        await m.channel.close().catch(() => {})
      }),
    )
  }

  #links(): { send(header: { type: string }, body?: ArrayBufferView | null): Promise<void> }[] {
    const tracer = this.#session.tracer
    return this.#members.map((m) => (tracer ? tracedLink(m.channel, tracer) : m.channel))
  }

  /** Reads one member's frames: partial sums go to the hub; an error fails the session naming the member. */
  async #route(index: number, channel: FramedChannel, address: string): Promise<void> {
    const { tracer } = this.#session
    try {
      for await (const frame of channel) {
        if (tracer) traceReceive(tracer, frame.header, frame.body.byteLength, channel.remotePeer)
        if (frame.header.type === 'ar') {
          this.#hub?.deliver(index, frame)
        } else if (frame.header.type === 'error') {
          throw new PeerFailedError(channel.remotePeer, `stage member ${index + 1} (${address}) failed: ${String(frame.header.message)}`)
        } else {
          throw new PeerFailedError(channel.remotePeer, `stage member ${index + 1} (${address}) sent an unexpected ${String(frame.header.type)} frame`)
        }
      }
      if (!this.#closing) throw new PeerGoneError(channel.remotePeer, `stage member ${index + 1} (${address}) closed its stage stream`)
    } catch (err) {
      if (this.#closing) return
      const failure =
        err instanceof PeerFailedError
          ? err
          : new PeerFailedError(channel.remotePeer, `stage member ${index + 1} (${address}) went away: ${(err as Error).message}`, { cause: err })
      // The next allreduce fails naming the member; an error it reported fails the session at once.
      this.#hub?.fail(index, failure)
      if (err instanceof PeerFailedError) this.#session.fail(failure)
    }
  }
}

/**
 * A member of a stage without the master: waits for its leader to join (see {@link StageRegistry}), then runs the
 * forward passes and resets the leader relays, with the leader as allreduce hub.
 */
export class StageMember implements StageRole {
  readonly #session: StageSession
  readonly #registry: StageRegistry
  readonly #stageId: string
  readonly #shardIndex: number
  readonly #wireDtype: WireDtype
  #channel: FramedChannel | null = null
  #member: StarAllreduceMember | null = null
  #closing = false

  /** @param options.wireDtype - element type of the partials sent to the leader (default f32) */
  constructor(session: StageSession, registry: StageRegistry, stageId: string, shardIndex: number, options: StageMemberOptions = {}) {
    this.#session = session
    this.#registry = registry
    this.#stageId = stageId
    this.#shardIndex = shardIndex
    this.#wireDtype = options.wireDtype ?? 'f32'
    registry.expect(stageId, this)
  }

  get allreduce(): Allreduce {
    if (!this.#member) throw new ProtocolError('forward before the stage leader joined')
    return this.#member
  }

  async beforeForward(): Promise<void> {}
  async afterForward(): Promise<void> {}
  async reset(): Promise<void> {}

  /**
   * The leader's stream, after its `stage-join` for this stage: answers `joined` and serves it.
   * @throws ProtocolError when the join names another shard or the leader already joined
   */
  async attach(channel: FramedChannel, shardIndex: number): Promise<void> {
    if (this.#channel) throw new ProtocolError(`stage ${this.#stageId}: a leader already joined`)
    if (shardIndex !== this.#shardIndex) throw new ProtocolError(`stage-join for shard ${shardIndex}: this member runs shard ${this.#shardIndex}`)
    const { tracer } = this.#session
    this.#channel = channel
    const link = tracer ? tracedLink(channel, tracer) : channel
    this.#member = new StarAllreduceMember({ peer: channel.remotePeer, send: (header, body) => link.send(header, body) }, { wireDtype: this.#wireDtype })
    this.#registry.forget(this.#stageId)
    await channel.send({ type: 'joined' })
    void this.#serve(channel, this.#member)
  }

  async close(err?: Error): Promise<void> {
    this.#closing = true
    this.#registry.forget(this.#stageId)
    if (!this.#channel) return
    if (err) this.#channel.abort(err)
    else await this.#channel.close().catch(() => {})
  }

  async #serve(channel: FramedChannel, member: StarAllreduceMember): Promise<void> {
    const { tracer } = this.#session
    try {
      for await (const frame of channel) {
        if (tracer) traceReceive(tracer, frame.header, frame.body.byteLength, channel.remotePeer)
        if (frame.header.type === 'ar') {
          member.deliver(frame)
          continue
        }
        const msg = parseLeaderMessage(frame.header)
        if (msg.type === 'forward') {
          this.#session.queueForward(msg, f32Body(frame)) // [seq, dim] f32
        } else if (msg.type === 'reset') {
          this.#session.queueReset()
        } else if (msg.type === 'bye') {
          this.#closing = true
          await channel.close()
        } else {
          throw new ProtocolError('stage-join on a stage that already joined')
        }
      }
      if (!this.#closing) throw new PeerGoneError(channel.remotePeer, `stage leader ${channel.remotePeer} closed the stage stream`)
    } catch (err) {
      member.fail(err)
      if (this.#closing) return
      this.#session.fail(err as Error)
    }
  }
}

/**
 * Members waiting for their leader, by stage id. The agent hands every inbound stage stream to {@link accept}, which
 * reads the leader's `stage-join` and gives the stream to the member of that stage.
 */
export class StageRegistry {
  readonly #waiting = new Map<string, StageMember>()

  expect(stageId: string, member: StageMember): void {
    if (this.#waiting.has(stageId)) throw new ProtocolError(`stage ${stageId} is already expected by another session`)
    this.#waiting.set(stageId, member)
  }

  forget(stageId: string): void {
    this.#waiting.delete(stageId)
  }

  /**
   * Serves an inbound stage stream: its first frame must be a `stage-join` for an expected stage.
   * @throws ProtocolError (the stream is then aborted by the node) for anything else
   */
  async accept(channel: FramedChannel): Promise<void> {
    const frame = await channel.read({ signal: AbortSignal.timeout(JOIN_TIMEOUT_MS) })
    if (frame === null) {
      await channel.close().catch(() => {}) // the dialler closed at once: close our half too, or the stream lingers
      return
    }
    const msg = parseLeaderMessage(frame.header)
    if (msg.type !== 'stage-join') throw new ProtocolError(`stage stream from ${channel.remotePeer} began with ${msg.type}, not stage-join`)
    const member = this.#waiting.get(msg.stageId)
    if (!member) {
      await channel.send({ type: 'error', message: `no session here expects stage ${msg.stageId}` }).catch(() => {})
      await channel.close().catch(() => {})
      return
    }
    await member.attach(channel, msg.shardIndex)
  }
}
