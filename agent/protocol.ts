import type { TensorParallelPlan } from '../splitter/index.ts'

/**
 * Messages of the tensor-parallel protocol (`/edgeshard/tp/1.0.0`), one frame each: a msgpack header plus raw
 * little-endian tensor bytes. The master dials each worker and opens one persistent stream:
 *
 * master → worker: `plan`, then one `tensor` per weight, then `load-done`; per forward pass `forward`
 * (body: hidden state [seq, dim] f32); `reset` before a new sequence; `ar` (allreduce sums); `stats`; `trace`;
 * `bye`.
 * worker → master: `ready` after loading, `ar` (partial sums), `stats`, `trace` (body: the spans recorded since the
 * last `trace`, as UTF-8 JSON `RecordedSpan[]`; only when the plan said `trace: true`), `error` when it cannot go on.
 *
 * Pipeline and hybrid plans (see agent/stage-worker.ts): the `plan` frame gives the worker a `role`. `member` (the
 * default) is today's peer of the master's stage. A stage without the master has a `leader` (its shard 0, the stage's
 * allreduce hub) and `stage-member`s. After every worker is `ready`, the master sends each leader `stage` (its
 * members' addresses and shards); the leader dials them on `/edgeshard/stage/1.0.0` and answers `stage-ready`. Per
 * forward pass the master sends `forward` to the leader only, the leader relays it to its members, and answers
 * `stage-out` (body: the stage's output hidden state [seq, dim] f32); `reset` goes to the leader, which relays it.
 * `stats`, `trace` and `bye` still go to every worker directly. An `error` may name the peer that caused it (`peer`,
 * e.g. a leader's member that went away).
 *
 * Failure and recovery (see cluster.ts): a `plan` with `heartbeatMs` makes the worker send `ping` whenever it
 * has sent nothing else for that long, so the master can tell a silent (stalled) worker from a busy one; its
 * `peerDeadlineMs` is the base deadline a stage leader gives its members' allreduce partials (see peer-deadline.ts).
 * Its `wireDtype` (`f32` or `f16`, default f32) is the element type of the `ar` frames the worker sends (its partials;
 * a stage leader's sums to its members too); an `ar` frame declares its dtype and receivers decode either. Hidden
 * states (`forward`, `stage-out`) stay f32.
 * When the master loses a worker it sends every survivor `abort` { epoch, step, keep? }: the survivor drops its
 * in-flight forward passes and allreduce rounds without reporting them (they fail because of the lost peer, not
 * because of it), ignores `forward` and `ar` frames of steps before `step`, and answers `aborted` { epoch } once
 * nothing of the old passes is left to send. With `keep` it keeps its shard (KV cache emptied) and the master carries
 * on with the same plan, the lost shard on the master; without, it releases its shard and stage role and the master
 * sends a new `plan` and shard on the same stream. The master ignores a survivor's frames from before `aborted`. An `error` naming another peer (`peer`)
 * does not end the reporting worker's session: it waits for `abort`.
 *
 * Workers never receive token ids or text: only weights and hidden states.
 */
export type MasterMessage =
  | {
      type: 'plan'
      plan: TensorParallelPlan
      shardIndex: number
      threads: number
      /** Decoder layers per graph for a shard without allreduce partners (see ShardRunnerOptions); absent: the default. */
      layersPerGraph?: number
      trace?: boolean
      /** Default `member`. */
      role?: StageRole
      /** Names the stage on the stage protocol (leader and stage-members only). */
      stageId?: string
      /** Link emulation (`edgeshard emulate`): shape what this worker sends to each peer, once its shard is loaded. */
      links?: readonly EmulatedLink[]
      /** Send `ping` whenever nothing else was sent for this long, ms (absent: no heartbeats). */
      heartbeatMs?: number
      /** A leader's base deadline for its members' allreduce partials, ms (absent: none; see peer-deadline.ts). */
      peerDeadlineMs?: number
      /**
       * Element type of the allreduce tensors this worker sends (its partials; a leader's sums too): `f32` (absent)
       * or `f16` (see transport/allreduce.ts). Passed on unchecked: ShardIntake (shard-intake.ts) refuses anything else.
       */
      wireDtype?: unknown
    }
  | { type: 'stage'; members: readonly StageMemberAddress[] }
  | { type: 'tensor'; layer: number; name: WeightName; bits: 32 | 8 | 4; rows: number; cols: number }
  | { type: 'load-done'; tensors: number }
  | { type: 'forward'; step: number; pos0: number; seq: number }
  | { type: 'reset' }
  | { type: 'stats' }
  | { type: 'trace' }
  | { type: 'bye' }
  /**
   * Drop everything in flight; `step` is the first step of the passes that follow. `keep`: keep the shard (KV cache
   * emptied) for the same plan; otherwise release it and wait for a new plan.
   */
  | { type: 'abort'; epoch: number; step: number; keep?: boolean }

/**
 * A worker's part in a cluster plan: `member` of the master's stage (the master is its hub), `leader` of a stage
 * without the master (its hub, shard 0), or `stage-member` of such a stage (its leader is the hub).
 */
export type StageRole = 'member' | 'leader' | 'stage-member'

/** A leader's member: where to dial it and the shard it runs. */
export interface StageMemberAddress {
  readonly address: string
  readonly shardIndex: number
}

/** One emulated link from a worker to `peer` (peer id): round trip and rate, as `LinkEmulation`. */
export interface EmulatedLink {
  readonly peer: string
  readonly rttMs: number
  readonly bitsPerSecond: number
}

/** A worker's counters since its shard was loaded (reply to `stats`). */
export interface WorkerStats {
  readonly forwards: number
  readonly computeMs: number
  readonly allreduceMs: number
  readonly ioWaitMs: number
  /** Blocks resident at most (sliding window W; all blocks when resident). */
  readonly window: number
  /** Resident set size now and at its peak (/proc VmHWM), bytes. */
  readonly rssBytes: number
  readonly peakRssBytes: number
  /** RSS once the runtime was up and before any weight block was loaded: the agent's own overhead, bytes. */
  readonly overheadBytes: number
}

/**
 * Header of a worker's reply to `trace`: its clock origin (`performance.timeOrigin`, Unix ms) and its wall clock when
 * the request arrived and when the reply left (Unix ms), for the master's NTP-style offset estimate (see trace.ts).
 */
export interface WorkerTraceHeader {
  readonly timeOriginMs: number
  readonly receivedMs: number
  readonly sentMs: number
}

export type WorkerMessage =
  | { type: 'ready'; shardIndex: number }
  | ({ type: 'stats' } & WorkerStats)
  | ({ type: 'trace' } & WorkerTraceHeader)
  | { type: 'error'; message: string; errorName?: string; peer?: string }
  | { type: 'stage-ready' }
  | { type: 'stage-out'; step: number; seq: number }
  | { type: 'ping' }
  | { type: 'aborted'; epoch: number }

/**
 * Weight names of a layer shard (graph input names of the attention and FFN blocks). A `tensor` frame's body is
 * the f32 values [rows, cols] (bits 32; vectors have rows 1), or for bits 8/4 the MatMulNBits blob
 * [rows, cols/32, 32·bits/8] uint8 followed by the scales [rows·cols/32] f32.
 */
export const WEIGHT_NAMES = ['attn_norm', 'wq', 'wk', 'wv', 'wo', 'bq', 'bk', 'bv', 'ffn_norm', 'w1', 'w3', 'w2'] as const
export type WeightName = (typeof WEIGHT_NAMES)[number]

/** Names of 1-D weights (norms, biases): always f32, sent with rows 1. */
export const VECTOR_NAMES: ReadonlySet<WeightName> = new Set(['attn_norm', 'ffn_norm', 'bq', 'bk', 'bv'])

/** Body bytes of a `tensor` frame. */
export function tensorBodyBytes(bits: 32 | 8 | 4, rows: number, cols: number): number {
  return bits === 32 ? rows * cols * 4 : (rows * cols * bits) / 8 + ((rows * cols) / 32) * 4
}

/** A stage id: hex digits (the master draws 64 random bits per stage and run). */
const STAGE_ID = /^[0-9a-f]{16,64}$/
const MAX_STAGE_MEMBERS = 256

/** @throws ProtocolError naming the entry and field */
function parseLinks(value: unknown): EmulatedLink[] {
  if (!Array.isArray(value) || value.length > 1024) throw new ProtocolError('frame plan: links must be an array of at most 1024')
  return value.map((entry: unknown, i) => {
    const v = (entry ?? {}) as Record<string, unknown>
    const { peer, rttMs, bitsPerSecond } = v
    if (typeof peer !== 'string' || peer.length === 0 || peer.length > 128) throw new ProtocolError(`frame plan: link ${i} has no peer id`)
    if (typeof rttMs !== 'number' || !(rttMs >= 0 && rttMs <= 60_000)) throw new ProtocolError(`frame plan: link ${i} rttMs must be 0..60000, got ${JSON.stringify(rttMs)}`)
    if (typeof bitsPerSecond !== 'number' || !(bitsPerSecond > 0 && Number.isFinite(bitsPerSecond))) {
      throw new ProtocolError(`frame plan: link ${i} bitsPerSecond must be a positive number, got ${JSON.stringify(bitsPerSecond)}`)
    }
    return { peer, rttMs, bitsPerSecond }
  })
}

/** A header that failed validation: the message names the field and what was expected. */
export class ProtocolError extends Error {
  static override name = 'ProtocolError'
  constructor(message: string) {
    super(message)
    this.name = 'ProtocolError'
  }
}

function int(h: Record<string, unknown>, key: string, min = 0): number {
  const v = h[key]
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
    throw new ProtocolError(`frame ${String(h.type)}: field ${key} must be an integer ≥ ${min}, got ${JSON.stringify(v)}`)
  }
  return v
}

/** Longest heartbeat interval or deadline a plan may ask for, ms (an hour). */
const MAX_MS = 3_600_000

function boundedMs(h: Record<string, unknown>, key: string, min: number): number {
  const v = h[key]
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > MAX_MS) {
    throw new ProtocolError(`frame ${String(h.type)}: field ${key} must be an integer in [${min}, ${MAX_MS}] ms, got ${JSON.stringify(v)}`)
  }
  return v
}

/**
 * Checks a header received by a worker.
 * @throws ProtocolError naming the message type and field.
 */
export function parseMasterMessage(h: Record<string, unknown>): MasterMessage {
  switch (h.type) {
    case 'plan': {
      const plan = h.plan as TensorParallelPlan | undefined
      if (plan?.kind !== 'tensor-parallel' || plan.version !== 1 || !Array.isArray(plan.shards)) {
        throw new ProtocolError('frame plan: expected a tensor-parallel plan of version 1')
      }
      const role = h.role ?? 'member'
      if (role !== 'member' && role !== 'leader' && role !== 'stage-member') {
        throw new ProtocolError(`frame plan: role must be member, leader or stage-member, got ${JSON.stringify(role)}`)
      }
      const shardIndex = int(h, 'shardIndex', role === 'leader' ? 0 : 1)
      if (shardIndex >= plan.shards.length) throw new ProtocolError(`frame plan: shard ${shardIndex} is not in a plan of ${plan.shards.length}`)
      if (role === 'leader' && shardIndex !== 0) throw new ProtocolError(`frame plan: a stage leader runs shard 0, got ${shardIndex}`)
      const stageId = h.stageId
      if (role !== 'member' && (typeof stageId !== 'string' || !STAGE_ID.test(stageId))) {
        throw new ProtocolError(`frame plan: a ${role} needs a stageId of 16 to 64 hex digits, got ${JSON.stringify(stageId)}`)
      }
      const links = h.links === undefined ? undefined : parseLinks(h.links)
      const { start, count } = plan.layers ?? {}
      const nLayers = plan.model?.nLayers
      if (!Number.isInteger(start) || !Number.isInteger(count) || start! < 0 || count! < 1 || !Number.isInteger(nLayers) || start! + count! > nLayers) {
        throw new ProtocolError(`frame plan: layers ${JSON.stringify(plan.layers)} are not a range inside the model's ${JSON.stringify(nLayers)} layers`)
      }
      if (h.trace !== undefined && typeof h.trace !== 'boolean') throw new ProtocolError(`frame plan: field trace must be a boolean, got ${JSON.stringify(h.trace)}`)
      const heartbeatMs = h.heartbeatMs === undefined ? undefined : boundedMs(h, 'heartbeatMs', 10)
      const peerDeadlineMs = h.peerDeadlineMs === undefined ? undefined : boundedMs(h, 'peerDeadlineMs', 1)
      const layersPerGraph = h.layersPerGraph === undefined ? undefined : int(h, 'layersPerGraph', 0)
      return {
        type: 'plan',
        plan,
        shardIndex,
        threads: int(h, 'threads', 1),
        ...(layersPerGraph !== undefined ? { layersPerGraph } : {}),
        ...(h.trace ? { trace: true } : {}),
        ...(role !== 'member' ? { role, stageId: stageId as string } : {}),
        ...(links ? { links } : {}),
        ...(heartbeatMs !== undefined ? { heartbeatMs } : {}),
        ...(peerDeadlineMs !== undefined ? { peerDeadlineMs } : {}),
        ...(h.wireDtype !== undefined ? { wireDtype: h.wireDtype } : {}),
      }
    }
    case 'stage': {
      const members = h.members
      if (!Array.isArray(members) || members.length > MAX_STAGE_MEMBERS) {
        throw new ProtocolError(`frame stage: members must be an array of at most ${MAX_STAGE_MEMBERS}`)
      }
      return {
        type: 'stage',
        members: members.map((m: unknown, i) => {
          const v = (m ?? {}) as Record<string, unknown>
          if (typeof v.address !== 'string' || v.address.length > 512) throw new ProtocolError(`frame stage: member ${i} has no address`)
          const shardIndex = v.shardIndex
          if (shardIndex !== i + 1) throw new ProtocolError(`frame stage: member ${i} must run shard ${i + 1}, got ${JSON.stringify(shardIndex)}`)
          return { address: v.address, shardIndex }
        }),
      }
    }
    case 'tensor': {
      const name = h.name
      if (!WEIGHT_NAMES.includes(name as WeightName)) throw new ProtocolError(`frame tensor: unknown weight ${JSON.stringify(name)}`)
      const bits = h.bits
      if (bits !== 32 && bits !== 8 && bits !== 4) throw new ProtocolError(`frame tensor: bits must be 32, 8 or 4, got ${JSON.stringify(bits)}`)
      const cols = int(h, 'cols', 1)
      if (bits !== 32 && cols % 32 !== 0) throw new ProtocolError(`frame tensor: ${bits}-bit weight with ${cols} columns, not a multiple of 32`)
      return { type: 'tensor', layer: int(h, 'layer'), name: name as WeightName, bits, rows: int(h, 'rows', 1), cols }
    }
    case 'load-done':
      return { type: 'load-done', tensors: int(h, 'tensors') }
    case 'forward':
      return { type: 'forward', step: int(h, 'step'), pos0: int(h, 'pos0'), seq: int(h, 'seq', 1) }
    case 'reset':
      return { type: 'reset' }
    case 'stats':
      return { type: 'stats' }
    case 'trace':
      return { type: 'trace' }
    case 'bye':
      return { type: 'bye' }
    case 'abort': {
      if (h.keep !== undefined && typeof h.keep !== 'boolean') throw new ProtocolError(`frame abort: field keep must be a boolean, got ${JSON.stringify(h.keep)}`)
      return { type: 'abort', epoch: int(h, 'epoch', 1), step: int(h, 'step'), ...(h.keep ? { keep: true } : {}) }
    }
    default:
      throw new ProtocolError(`unexpected frame type ${JSON.stringify(h.type)} from the master`)
  }
}
