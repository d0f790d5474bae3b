import type { Allreduce } from '../transport/index.ts'
import {
  type AttentionShardWeights,
  buildAttentionBlock,
  buildFfnBlock,
  type FfnShardWeights,
  type GraphConstants,
  type LayerShardWeights,
  type QuantizedInputs,
  type StreamedLinearWeight,
  ropeTables,
  type ShardSpec,
  type TensorParallelPlan,
} from '../splitter/index.ts'
import { type HostTensor, type RuntimeOptions, Session } from './runtime.ts'
import type { Tracer } from './trace.ts'
import { ResidentStore, STREAMED_INTERMEDIATE_BYTES, type WeightStore } from './weight-store.ts'

/** Time spent in one forward pass of a shard, in milliseconds. */
export interface ForwardTimings {
  /** Inside onnxruntime (attention and FFN graphs). */
  computeMs: number
  /** Waiting for allreduce results (network plus slower peers). */
  allreduceMs: number
  /** Waiting for weight blocks still being read from disk (sliding window). */
  ioWaitMs: number
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
  readonly #store: WeightStore | null
  readonly #window: number
  // Per layer: a session with that layer's weights baked in, or one shared session fed the weights as inputs.
  readonly #attention: readonly (Session | null)[]
  readonly #ffn: readonly (Session | null)[]
  readonly #rope: { cos: Float32Array; sin: Float32Array }
  /** Rows of a forward pass one graph run takes at most (streamed quantized weights bound their intermediates). */
  readonly #rowsPerRun: number
  // Per layer: [kvHeads, cachedLen, headDim] f32
  #pastK: Float32Array[]
  #pastV: Float32Array[]
  #cachedLen = 0

  private constructor(
    plan: TensorParallelPlan,
    shard: ShardSpec,
    store: WeightStore | null,
    window: number,
    attention: readonly (Session | null)[],
    ffn: readonly (Session | null)[],
    rowsPerRun = Number.POSITIVE_INFINITY,
  ) {
    this.#rowsPerRun = rowsPerRun
    this.plan = plan
    this.shard = shard
    this.#store = store
    this.#window = window
    this.#attention = attention
    this.#ffn = ffn
    const m = plan.model
    this.#rope = ropeTables(m.maxSeqLen, m.headDim, m.ropeTheta, m.ropeStyle)
    this.#pastK = Array.from({ length: m.nLayers }, () => new Float32Array(0))
    this.#pastV = Array.from({ length: m.nLayers }, () => new Float32Array(0))
  }

  /**
   * Builds the shard's graphs and loads them into onnxruntime.
   * @param weights one entry per layer, cut for `plan.shards[shardIndex]` (see `sliceLayerShard`), or a store that
   *   streams them (sliding window).
   * @throws RangeError when the weights do not match the plan; RuntimeError when ORT refuses a graph.
   */
  static async create(
    plan: TensorParallelPlan,
    shardIndex: number,
    weights: readonly LayerShardWeights[] | WeightStore,
    options: RuntimeOptions = {},
  ): Promise<ShardRunner> {
    const shard = plan.shards[shardIndex]
    if (!shard) throw new RangeError(`cannot run shard ${shardIndex}: the plan has ${plan.shards.length} shards`)
    const m = plan.model
    let store: WeightStore
    if (Array.isArray(weights)) {
      const layers = weights as readonly LayerShardWeights[]
      if (layers.length !== m.nLayers) throw new RangeError(`cannot run shard ${shardIndex}: ${layers.length} layers of weights, plan has ${m.nLayers}`)
      // One session per block kind serves every layer (the weights are inputs), so layers must agree on storage.
      const first = plan.layers.start
      const a0 = layers[first]?.attention
      const f0 = layers[first]?.ffn
      for (let layer = first; layer < first + plan.layers.count; layer++) {
        const w = layers[layer]!
        if ((w.attention === null) !== (shard.kvHeads.count === 0) || (w.ffn === null) !== (shard.ffnColumns.count === 0)) {
          throw new RangeError(`cannot run shard ${shardIndex}: layer ${layer} weights do not match the plan's shares`)
        }
        const sameA = !a0 || (w.attention && (['wq', 'wk', 'wv', 'wo'] as const).every((n) => w.attention![n].bits === a0[n].bits))
        const sameF = !f0 || (w.ffn && (['w1', 'w3', 'w2'] as const).every((n) => w.ffn![n].bits === f0[n].bits))
        if (!sameA || !sameF) throw new RangeError(`cannot run shard ${shardIndex}: layer ${layer} stores its weights differently from layer ${first}`)
      }
      store = new ResidentStore(layers)
    } else {
      store = weights as WeightStore
    }
    if ((store.layout.attention === null) !== (shard.kvHeads.count === 0) || (store.layout.ffn === null) !== (shard.ffnColumns.count === 0)) {
      throw new RangeError(`cannot run shard ${shardIndex}: its weights do not match the plan's shares`)
    }
    const a0 = store.layout.attention
    const f0 = store.layout.ffn
    const attentionShape = a0 && {
      dim: m.dim,
      headDim: m.headDim,
      heads: shard.heads.count,
      kvHeads: shard.kvHeads.count,
      normEps: m.normEps,
      ropeStyle: m.ropeStyle,
      qkvBias: m.qkvBias,
      bits: a0,
      quantizedMatmul: plan.quantizedMatmul,
    }
    const ffnShape = f0 && { dim: m.dim, columns: shard.ffnColumns.count, normEps: m.normEps, bits: f0, quantizedMatmul: plan.quantizedMatmul }
    const window = store.window
    if (store instanceof ResidentStore) {
      // Resident: one session per layer and block with the weights baked in as initializers (ORT pre-packs them;
      // MatMulNBits is ~400× slower with B as an input). Our copies are dropped once ORT holds its own.
      const attention: (Session | null)[] = Array.from({ length: plan.layers.start }, () => null)
      const ffn: (Session | null)[] = Array.from({ length: plan.layers.start }, () => null)
      for (let layer = plan.layers.start; layer < plan.layers.start + plan.layers.count; layer++) {
        attention.push(
          attentionShape
            ? await Session.create(`attention ${layer}`, buildAttentionBlock(attentionShape, asConstants(attentionWeightFeeds(await store.attention(layer)))), options)
            : null,
        )
        ffn.push(ffnShape ? await Session.create(`ffn ${layer}`, buildFfnBlock(ffnShape, asConstants(ffnWeightFeeds(await store.ffn(layer)))), options) : null)
      }
      await store.close()
      return new ShardRunner(plan, shard, null, window, attention, ffn)
    }
    // Streaming: one session per block kind, fed each layer's weights from the sliding window. Quantized weights come
    // blockwise (MatMulNBits is only fast on constants): int8 dot products per block like MatMulNBits' accuracy
    // level 4, or exact f32 expansion; the int8 kernel's intermediates grow with the rows of a run, so long passes
    // (prefill) run in chunks of rows while the block is resident (no extra reads).
    const quantizedInputs: QuantizedInputs = plan.quantizedMatmul === 'int8' ? 'blockwise-int8' : 'blockwise-f32'
    const attention = attentionShape ? await Session.create('attention', buildAttentionBlock({ ...attentionShape, quantizedInputs }), options) : null
    const ffn = ffnShape ? await Session.create('ffn', buildFfnBlock({ ...ffnShape, quantizedInputs }), options) : null
    const quantized = Object.values({ ...a0, ...f0 }).some((bits) => bits !== 32)
    const widest = m.dim * Math.max(shard.heads.count * m.headDim, shard.ffnColumns.count) // max over linears of in·out
    const rowsPerRun =
      quantized && quantizedInputs === 'blockwise-int8' ? Math.max(1, Math.floor(STREAMED_INTERMEDIATE_BYTES / ((widest / 32) * 4))) : Number.POSITIVE_INFINITY
    const layers = Array.from({ length: m.nLayers }, () => 0)
    return new ShardRunner(plan, shard, store, window, layers.map(() => attention), layers.map(() => ffn), rowsPerRun)
  }

  /** Positions held in the KV cache. */
  get cachedLength(): number {
    return this.#cachedLen
  }

  /** Forgets the KV cache: the next forward starts a sequence at position 0. */
  reset(): void {
    this.#pastK = this.#pastK.map(() => new Float32Array(0))
    this.#pastV = this.#pastV.map(() => new Float32Array(0))
    this.#cachedLen = 0
  }

  /** The weight store's window (blocks resident at most) and its I/O wait so far. */
  get weights(): { readonly window: number; readonly ioWaitMs: number } {
    return { window: this.#window, ioWaitMs: this.#store?.ioWaitMs ?? 0 }
  }

  /**
   * Runs the plan's layers (`plan.layers`, all of them for pure tensor parallelism) on `x` [seq, dim] f32 (positions pos0..pos0+seq-1, pos0 = cachedLength) in place and returns it.
   * Every peer of the plan must call this with the same `step`, `pos0` and `x`.
   * @param tracer when given, records per layer `attention` / `ffn` (compute), `allreduce` (wait) and, streaming
   *   weights, `weights` (I/O) spans, plus one `forward` span around them.
   * @throws RangeError when pos0 is not the cached length or the sequence would pass maxSeqLen; whatever the
   *   allreduce throws (a peer gone).
   */
  async forward(x: Float32Array, pos0: number, step: number, allreduce: Allreduce, timings?: ForwardTimings, tracer?: Tracer): Promise<Float32Array> {
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

    const store = this.#store
    const io0 = store?.ioWaitMs ?? 0
    const forwardStart = tracer ? now() : 0
    for (let layer = this.plan.layers.start; layer < this.plan.layers.start + this.plan.layers.count; layer++) {
      let partial: Float32Array | null = null
      let t0 = now()
      const attention = this.#attention[layer]
      if (attention) {
        let weights = {}
        if (store) {
          const waited = store.ioWaitMs
          weights = attentionWeightFeeds(await store.attention(layer))
          if (tracer) tracer.span('weights', 'io', t0, now(), { layer, block: 'attention', step, waitMs: store.ioWaitMs - waited })
        }
        const tc = tracer ? now() : 0
        const parts: Float32Array[] = []
        // Rows [r0, r0 + n) at a time: each run appends its positions to the KV cache the next one attends to.
        for (let r0 = 0; r0 < seq; r0 += Math.min(seq, this.#rowsPerRun)) {
          const n = Math.min(this.#rowsPerRun, seq - r0)
          const p0 = pos0 + r0
          const whole = n === seq
          const out = await attention.run({
            x: whole ? rows(x, m.dim) : { data: x.subarray(r0 * m.dim, (r0 + n) * m.dim), dims: [n, m.dim] },
            cos: whole ? cos : { data: this.#rope.cos.subarray(p0 * hd, (p0 + n) * hd), dims: [n, hd] },
            sin: whole ? sin : { data: this.#rope.sin.subarray(p0 * hd, (p0 + n) * hd), dims: [n, hd] },
            mask: { data: whole ? mask : causalMask(n, p0), dims: [n, p0 + n] },
            past_k: { data: this.#pastK[layer]!, dims: [kvHeads, p0, hd] },
            past_v: { data: this.#pastV[layer]!, dims: [kvHeads, p0, hd] },
            ...weights,
          })
          this.#pastK[layer] = out.present_k!.data as Float32Array
          this.#pastV[layer] = out.present_v!.data as Float32Array
          parts.push(out.partial!.data as Float32Array)
        }
        if (tracer) tracer.span('attention', 'compute', tc, now(), { layer, step })
        store?.release(layer, 'attention')
        partial = concatRows(parts)
      }
      let t1 = now()
      const attnSum = await allreduce.allreduce(allreduceTag(step, m.nLayers, layer, 0), partial)
      let t2 = now()
      if (tracer) tracer.span('allreduce', 'allreduce', t1, t2, { layer, block: 'attention', step, tag: allreduceTag(step, m.nLayers, layer, 0) })
      addInPlace(x, attnSum)
      if (timings) {
        timings.computeMs += t1 - t0
        timings.allreduceMs += t2 - t1
      }

      partial = null
      t0 = now()
      const ffn = this.#ffn[layer]
      if (ffn) {
        let weights = {}
        if (store) {
          const waited = store.ioWaitMs
          weights = ffnWeightFeeds(await store.ffn(layer))
          if (tracer) tracer.span('weights', 'io', t0, now(), { layer, block: 'ffn', step, waitMs: store.ioWaitMs - waited })
        }
        const tc = tracer ? now() : 0
        const parts: Float32Array[] = []
        for (let r0 = 0; r0 < seq; r0 += Math.min(seq, this.#rowsPerRun)) {
          const n = Math.min(this.#rowsPerRun, seq - r0)
          const h = n === seq ? rows(x, m.dim) : { data: x.subarray(r0 * m.dim, (r0 + n) * m.dim), dims: [n, m.dim] }
          parts.push((await ffn.run({ h, ...weights })).partial!.data as Float32Array)
        }
        if (tracer) tracer.span('ffn', 'compute', tc, now(), { layer, step })
        store?.release(layer, 'ffn')
        partial = concatRows(parts)
      }
      t1 = now()
      const ffnSum = await allreduce.allreduce(allreduceTag(step, m.nLayers, layer, 1), partial)
      t2 = now()
      if (tracer) tracer.span('allreduce', 'allreduce', t1, t2, { layer, block: 'ffn', step, tag: allreduceTag(step, m.nLayers, layer, 1) })
      addInPlace(x, ffnSum)
      if (timings) {
        timings.computeMs += t1 - t0
        timings.allreduceMs += t2 - t1
      }
    }
    this.#cachedLen = total
    if (tracer) tracer.span('forward', 'forward', forwardStart, now(), { step, pos0, seq })
    if (timings) {
      // I/O wait happened inside the compute spans above; report it on its own.
      const io = (store?.ioWaitMs ?? 0) - io0
      timings.ioWaitMs += io
      timings.computeMs -= io
    }
    return x
  }

  /** Releases the ORT sessions. */
  async release(): Promise<void> {
    for (const session of new Set([...this.#attention, ...this.#ffn])) await session?.release()
    await this.#store?.close()
  }
}

/** Weight feeds as graph constants (weights are only ever f32 or uint8). */
export function asConstants(feeds: Record<string, HostTensor>): GraphConstants {
  const out: Record<string, { data: Float32Array | Uint8Array; dims: readonly number[] }> = {}
  for (const [name, t] of Object.entries(feeds)) {
    if (!(t.data instanceof Float32Array || t.data instanceof Uint8Array)) throw new TypeError(`weight ${name} is neither f32 nor uint8`)
    out[name] = { data: t.data, dims: t.dims }
  }
  return out
}

/** Weight inputs of the attention graph (names as in `buildAttentionBlock`). */
function attentionWeightFeeds(a: AttentionShardWeights<StreamedLinearWeight>): Record<string, HostTensor> {
  const vec = (t: Float32Array): HostTensor => ({ data: t, dims: [t.length] })
  return {
    attn_norm: vec(a.attn_norm),
    ...linearFeeds('wq', a.wq),
    ...linearFeeds('wk', a.wk),
    ...linearFeeds('wv', a.wv),
    ...linearFeeds('wo', a.wo),
    ...(a.bias ? { bq: vec(a.bias.bq), bk: vec(a.bias.bk), bv: vec(a.bias.bv) } : {}),
  }
}

/** Weight inputs of the FFN graph (names as in `buildFfnBlock`). */
function ffnWeightFeeds(f: FfnShardWeights<StreamedLinearWeight>): Record<string, HostTensor> {
  return {
    ffn_norm: { data: f.ffn_norm, dims: [f.ffn_norm.length] },
    ...linearFeeds('w1', f.w1),
    ...linearFeeds('w3', f.w3),
    ...linearFeeds('w2', f.w2),
  }
}

/**
 * Graph feeds of linear weight `name` (see `linear` in splitter/graph/llama-blocks.ts): `name` f32 [out, in];
 * MatMulNBits: `name` uint8 [out, in/32, 32·bits/8] plus `name_scales` f32 [out·in/32]; blockwise: `name` uint8
 * [in/32, 32, out] plus `name_scales` f32 [in/32, 1, out].
 */
export function linearFeeds(name: string, w: StreamedLinearWeight): Record<string, HostTensor> {
  if (w.bits === 32) return { [name]: { data: w.data, dims: [w.rows, w.cols] } }
  if ('layout' in w) {
    return {
      [name]: { data: w.values, dims: [w.cols / 32, 32, w.rows] },
      [`${name}_scales`]: { data: w.scales, dims: [w.cols / 32, 1, w.rows] },
    }
  }
  return {
    [name]: { data: w.blob, dims: [w.rows, w.cols / 32, (32 * w.bits) / 8] },
    [`${name}_scales`]: { data: w.scales, dims: [w.scales.length] },
  }
}

/** `parts` ([rows_i, dim] f32 each) stacked; the part itself when there is one. */
function concatRows(parts: readonly Float32Array[]): Float32Array {
  if (parts.length === 1) return parts[0]!
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0))
  let offset = 0
  for (const p of parts) {
    out.set(p, offset)
    offset += p.length
  }
  return out
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
