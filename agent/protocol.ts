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
 * Workers never receive token ids or text: only weights and hidden states.
 */
export type MasterMessage =
  | { type: 'plan'; plan: TensorParallelPlan; shardIndex: number; threads: number; trace?: boolean }
  | { type: 'tensor'; layer: number; name: WeightName; bits: 32 | 8 | 4; rows: number; cols: number }
  | { type: 'load-done'; tensors: number }
  | { type: 'forward'; step: number; pos0: number; seq: number }
  | { type: 'reset' }
  | { type: 'stats' }
  | { type: 'trace' }
  | { type: 'bye' }

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
  | { type: 'error'; message: string; errorName?: string }

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
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
    throw new ProtocolError(`frame ${String(h.type)}: field ${key} must be an integer ≥ ${min}, got ${JSON.stringify(v)}`)
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
      const shardIndex = int(h, 'shardIndex', 1)
      if (shardIndex >= plan.shards.length) throw new ProtocolError(`frame plan: shard ${shardIndex} is not in a plan of ${plan.shards.length}`)
      const { start, count } = plan.layers ?? {}
      const nLayers = plan.model?.nLayers
      if (!Number.isInteger(start) || !Number.isInteger(count) || start! < 0 || count! < 1 || !Number.isInteger(nLayers) || start! + count! > nLayers) {
        throw new ProtocolError(`frame plan: layers ${JSON.stringify(plan.layers)} are not a range inside the model's ${JSON.stringify(nLayers)} layers`)
      }
      if (h.trace !== undefined && typeof h.trace !== 'boolean') throw new ProtocolError(`frame plan: field trace must be a boolean, got ${JSON.stringify(h.trace)}`)
      return { type: 'plan', plan, shardIndex, threads: int(h, 'threads', 1), ...(h.trace ? { trace: true } : {}) }
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
    default:
      throw new ProtocolError(`unexpected frame type ${JSON.stringify(h.type)} from the master`)
  }
}
