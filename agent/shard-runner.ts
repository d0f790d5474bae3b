import type { Allreduce } from '../transport/index.ts'
import {
  buildAttentionBlock,
  buildFfnBlock,
  type LayerShardWeights,
  ropeTables,
  type ShardSpec,
  type TensorParallelPlan,
} from '../splitter/index.ts'
import { type HostTensor, type RuntimeOptions, Session } from './runtime.ts'

/** Time spent in one forward pass of a shard, in milliseconds. */
export interface ForwardTimings {
  /** Inside onnxruntime (attention and FFN graphs). */
  computeMs: number
  /** Waiting for allreduce results (network plus slower peers). */
  allreduceMs: number
}

/** Allreduce tag of sync point `phase` (0 attention, 1 FFN) of `layer` in forward pass `step`. */
export function allreduceTag(step: number, nLayers: number, layer: number, phase: 0 | 1): number {
  return (step * nLayers + layer) * 2 + phase
}

/**
 * Executes one peer's share of every decoder layer for a tensor-parallel plan: the same code on the master and on
 * every worker, and with one shard for a single device.
 *
 * Per layer: attention share → allreduce → residual add → FFN share → allreduce → residual add. The KV cache of the
 * peer's own KV heads grows by the forwarded positions; `reset()` starts a new sequence.
 */
export class ShardRunner {
  readonly plan: TensorParallelPlan
  readonly shard: ShardSpec
  readonly #weights: readonly LayerShardWeights[]
  readonly #attention: Session | null
  readonly #ffn: Session | null
  readonly #rope: { cos: Float32Array; sin: Float32Array }
  // Per layer: [kvHeads, cachedLen, headDim] f32
  #pastK: Float32Array[]
  #pastV: Float32Array[]
  #cachedLen = 0

  private constructor(
    plan: TensorParallelPlan,
    shard: ShardSpec,
    weights: readonly LayerShardWeights[],
    attention: Session | null,
    ffn: Session | null,
  ) {
    this.plan = plan
    this.shard = shard
    this.#weights = weights
    this.#attention = attention
    this.#ffn = ffn
    const m = plan.model
    this.#rope = ropeTables(m.maxSeqLen, m.headDim, m.ropeTheta, m.ropeStyle)
    this.#pastK = weights.map(() => new Float32Array(0))
    this.#pastV = weights.map(() => new Float32Array(0))
  }

  /**
   * Builds the shard's graphs and loads them into onnxruntime.
   * @param weights one entry per layer, cut for `plan.shards[shardIndex]` (see `sliceLayerShard`).
   * @throws RangeError when the weights do not match the plan; RuntimeError when ORT refuses a graph.
   */
  static async create(
    plan: TensorParallelPlan,
    shardIndex: number,
    weights: readonly LayerShardWeights[],
    options: RuntimeOptions = {},
  ): Promise<ShardRunner> {
    const shard = plan.shards[shardIndex]
    if (!shard) throw new RangeError(`cannot run shard ${shardIndex}: the plan has ${plan.shards.length} shards`)
    const m = plan.model
    if (weights.length !== m.nLayers) throw new RangeError(`cannot run shard ${shardIndex}: ${weights.length} layers of weights, plan has ${m.nLayers}`)
    for (const [layer, w] of weights.entries()) {
      if ((w.attention === null) !== (shard.kvHeads.count === 0) || (w.ffn === null) !== (shard.ffnColumns.count === 0)) {
        throw new RangeError(`cannot run shard ${shardIndex}: layer ${layer} weights do not match the plan's shares`)
      }
    }
    const attention =
      shard.kvHeads.count > 0
        ? await Session.create(
            'attention',
            buildAttentionBlock({
              dim: m.dim,
              headDim: m.headDim,
              heads: shard.heads.count,
              kvHeads: shard.kvHeads.count,
              normEps: m.normEps,
              ropeStyle: m.ropeStyle,
            }),
            options,
          )
        : null
    const ffn =
      shard.ffnColumns.count > 0
        ? await Session.create('ffn', buildFfnBlock({ dim: m.dim, columns: shard.ffnColumns.count, normEps: m.normEps }), options)
        : null
    return new ShardRunner(plan, shard, weights, attention, ffn)
  }

  /** Positions held in the KV cache. */
  get cachedLength(): number {
    return this.#cachedLen
  }

  /** Forgets the KV cache: the next forward starts a sequence at position 0. */
  reset(): void {
    this.#pastK = this.#weights.map(() => new Float32Array(0))
    this.#pastV = this.#weights.map(() => new Float32Array(0))
    this.#cachedLen = 0
  }

  /**
   * Runs all layers on `x` [seq, dim] f32 (positions pos0..pos0+seq-1, pos0 = cachedLength) in place and returns it.
   * Every peer of the plan must call this with the same `step`, `pos0` and `x`.
   * @throws RangeError when pos0 is not the cached length or the sequence would pass maxSeqLen; whatever the
   *   allreduce throws (a peer gone).
   */
  async forward(x: Float32Array, pos0: number, step: number, allreduce: Allreduce, timings?: ForwardTimings): Promise<Float32Array> {
    const m = this.plan.model
    const seq = x.length / m.dim
    if (!Number.isInteger(seq) || seq < 1) throw new RangeError(`cannot forward ${x.length} values: not a whole number of rows of ${m.dim}`)
    if (pos0 !== this.#cachedLen) throw new RangeError(`cannot forward from position ${pos0}: the KV cache holds ${this.#cachedLen}`)
    const total = pos0 + seq
    if (total > m.maxSeqLen) throw new RangeError(`cannot forward to position ${total}: the model's context is ${m.maxSeqLen}`)
    const hd = m.headDim
    const kvHeads = this.shard.kvHeads.count
    const rows = (t: Float32Array, cols: number): HostTensor => ({ data: t, dims: [t.length / cols, cols] })
    const cos: HostTensor = { data: this.#rope.cos.subarray(pos0 * hd, total * hd), dims: [seq, hd] }
    const sin: HostTensor = { data: this.#rope.sin.subarray(pos0 * hd, total * hd), dims: [seq, hd] }
    const mask = causalMask(seq, pos0)
    const now = performance.now.bind(performance)

    for (let layer = 0; layer < m.nLayers; layer++) {
      const w = this.#weights[layer]!
      let partial: Float32Array | null = null
      let t0 = now()
      if (this.#attention && w.attention) {
        const a = w.attention
        const out = await this.#attention.run({
          x: rows(x, m.dim),
          cos,
          sin,
          mask: { data: mask, dims: [seq, total] },
          past_k: { data: this.#pastK[layer]!, dims: [kvHeads, pos0, hd] },
          past_v: { data: this.#pastV[layer]!, dims: [kvHeads, pos0, hd] },
          attn_norm: { data: a.attn_norm, dims: [m.dim] },
          wq: rows(a.wq, m.dim),
          wk: rows(a.wk, m.dim),
          wv: rows(a.wv, m.dim),
          wo: rows(a.wo, a.wq.length / m.dim),
        })
        this.#pastK[layer] = out.present_k!.data as Float32Array
        this.#pastV[layer] = out.present_v!.data as Float32Array
        partial = out.partial!.data as Float32Array
      }
      let t1 = now()
      const attnSum = await allreduce.allreduce(allreduceTag(step, m.nLayers, layer, 0), partial)
      let t2 = now()
      addInPlace(x, attnSum)
      if (timings) {
        timings.computeMs += t1 - t0
        timings.allreduceMs += t2 - t1
      }

      partial = null
      t0 = now()
      if (this.#ffn && w.ffn) {
        const f = w.ffn
        const out = await this.#ffn.run({
          h: rows(x, m.dim),
          ffn_norm: { data: f.ffn_norm, dims: [m.dim] },
          w1: rows(f.w1, m.dim),
          w3: rows(f.w3, m.dim),
          w2: rows(f.w2, f.w1.length / m.dim),
        })
        partial = out.partial!.data as Float32Array
      }
      t1 = now()
      const ffnSum = await allreduce.allreduce(allreduceTag(step, m.nLayers, layer, 1), partial)
      t2 = now()
      addInPlace(x, ffnSum)
      if (timings) {
        timings.computeMs += t1 - t0
        timings.allreduceMs += t2 - t1
      }
    }
    this.#cachedLen = total
    return x
  }

  /** Releases the ORT sessions. */
  async release(): Promise<void> {
    await this.#attention?.release()
    await this.#ffn?.release()
  }
}

/** Additive causal mask [seq, pos0 + seq] f32: row i may attend to positions ≤ pos0 + i. */
export function causalMask(seq: number, pos0: number): Float32Array {
  const total = pos0 + seq
  const mask = new Float32Array(seq * total)
  for (let i = 0; i < seq; i++) mask.fill(Number.NEGATIVE_INFINITY, i * total + pos0 + i + 1, (i + 1) * total)
  return mask
}

/** `x += y` element-wise (the residual connection after an allreduce). */
function addInPlace(x: Float32Array, y: Float32Array): void {
  if (x.length !== y.length) throw new RangeError(`cannot add ${y.length} values to a hidden state of ${x.length}`)
  for (let i = 0; i < x.length; i++) x[i]! += y[i]!
}
