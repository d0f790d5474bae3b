import type { TensorParallelPlan } from '../splitter/index.ts'

/**
 * Messages of the tensor-parallel protocol (`/edgeshard/tp/1.0.0`), one frame each: a msgpack header plus raw
 * little-endian tensor bytes. The master dials each worker and opens one persistent stream:
 *
 * master → worker: `plan`, then one `tensor` per weight, then `load-done`; per forward pass `forward`
 * (body: hidden state [seq, dim] f32); `reset` before a new sequence; `ar` (allreduce sums); `bye`.
 * worker → master: `ready` after loading, `ar` (partial sums), `error` when it cannot go on.
 *
 * Workers never receive token ids or text: only weights and hidden states.
 */
export type MasterMessage =
  | { type: 'plan'; plan: TensorParallelPlan; shardIndex: number; threads: number }
  | { type: 'tensor'; layer: number; name: WeightName }
  | { type: 'load-done'; tensors: number }
  | { type: 'forward'; step: number; pos0: number; seq: number }
  | { type: 'reset' }
  | { type: 'bye' }

export type WorkerMessage = { type: 'ready'; shardIndex: number } | { type: 'error'; message: string }

/** Weight names of a layer shard (graph input names of the attention and FFN blocks). */
export const WEIGHT_NAMES = ['attn_norm', 'wq', 'wk', 'wv', 'wo', 'ffn_norm', 'w1', 'w3', 'w2'] as const
export type WeightName = (typeof WEIGHT_NAMES)[number]

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
      return { type: 'plan', plan, shardIndex, threads: int(h, 'threads', 1) }
    }
    case 'tensor': {
      const name = h.name
      if (!WEIGHT_NAMES.includes(name as WeightName)) throw new ProtocolError(`frame tensor: unknown weight ${JSON.stringify(name)}`)
      return { type: 'tensor', layer: int(h, 'layer'), name: name as WeightName }
    }
    case 'load-done':
      return { type: 'load-done', tensors: int(h, 'tensors') }
    case 'forward':
      return { type: 'forward', step: int(h, 'step'), pos0: int(h, 'pos0'), seq: int(h, 'seq', 1) }
    case 'reset':
      return { type: 'reset' }
    case 'bye':
      return { type: 'bye' }
    default:
      throw new ProtocolError(`unexpected frame type ${JSON.stringify(h.type)} from the master`)
  }
}
