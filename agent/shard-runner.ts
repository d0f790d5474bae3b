import type { Allreduce } from '../transport/index.ts'
import {
  type AttentionKernel,
  type AttentionShardWeights,
  attentionKernel,
  buildAttentionBlock,
  buildDecoderLayers,
  buildFfnBlock,
  type FfnShardWeights,
  type GraphConstants,
  type LayerShardWeights,
  layerGroupSizes,
  MAX_GRAPH_WEIGHT_BYTES,
  type QuantizedInputs,
  ropeCaches,
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

/** Options of {@link ShardRunner.create}. */
export interface ShardRunnerOptions extends RuntimeOptions {
  /**
   * Most decoder layers per graph for a peer with no allreduce partner and resident weights (default: every layer of
   * the stage, at most {@link MAX_GRAPH_WEIGHT_BYTES} of weights per graph); 0 keeps one graph per attention and FFN
   * block, as with partners.
   */
  readonly layersPerGraph?: number
}

/** Positions by which the KV cache buffers of the 'gqa' kernel grow. */
const KV_CAPACITY_STEP = 64

/** A graph of whole decoder layers `first`..`first + count - 1`. */
interface LayerGroup {
  readonly session: Session
  readonly first: number
  readonly count: number
}

/**
 * Executes one peer's share of every decoder layer for a tensor-parallel plan: the same code on the master and on
 * every worker, and with one shard for a single device.
 *
 * Per layer: attention share → allreduce → residual add → FFN share → allreduce → residual add. A peer with no
 * allreduce partner (a plan of one shard) and resident weights runs whole layers per graph instead, residual adds
 * inside (see `buildDecoderLayers`). The KV cache of the peer's own KV heads grows by the forwarded positions;
 * `reset()` starts a new sequence.
 */
export class ShardRunner {
  readonly plan: TensorParallelPlan
  readonly shard: ShardSpec
  readonly #store: WeightStore | null
  readonly #window: number
  // Per layer: a session with that layer's weights baked in, or one shared session fed the weights as inputs.
  readonly #attention: readonly (Session | null)[]
  readonly #ffn: readonly (Session | null)[]
  // Whole layers per graph (no allreduce partner, resident weights), or null: one graph per block.
  readonly #groups: readonly LayerGroup[] | null
  readonly #kernel: AttentionKernel
  // 'gqa': ropeCaches [maxSeqLen, headDim/2] f32; 'ops': ropeTables [maxSeqLen, headDim] f32
  readonly #rope: { cos: Float32Array; sin: Float32Array }
  /** Rows of a forward pass one graph run takes at most (streamed quantized weights bound their intermediates). */
  readonly #rowsPerRun: number
  // Per layer, 'gqa' kernel: [1, kvHeads, #capacity, headDim] f32, positions 0..cachedLen-1 of each head first (the
  // graphs return only each step's K and V, written in here); 'ops': [kvHeads, cachedLen, headDim] f32.
  #pastK: Float32Array[]
  #pastV: Float32Array[]
  #capacity = 0
  #cachedLen = 0

  private constructor(
    plan: TensorParallelPlan,
    shard: ShardSpec,
    store: WeightStore | null,
    window: number,
    attention: readonly (Session | null)[],
    ffn: readonly (Session | null)[],
    groups: readonly LayerGroup[] | null,
    rowsPerRun = Number.POSITIVE_INFINITY,
  ) {
    this.#rowsPerRun = rowsPerRun
    this.plan = plan
    this.shard = shard
    this.#store = store
    this.#window = window
    this.#attention = attention
    this.#ffn = ffn
    this.#groups = groups
    const m = plan.model
    this.#kernel = attentionKernel(m.headDim)
    this.#rope = this.#kernel === 'gqa' ? ropeCaches(m.maxSeqLen, m.headDim, m.ropeTheta) : ropeTables(m.maxSeqLen, m.headDim, m.ropeTheta, m.ropeStyle)
    this.#pastK = Array.from({ length: m.nLayers }, () => new Float32Array(0))
    this.#pastV = Array.from({ length: m.nLayers }, () => new Float32Array(0))
  }

  /**
   * Builds the shard's graphs and loads them into onnxruntime.
   * @param weights one entry per layer, cut for `plan.shards[shardIndex]` (see `sliceLayerShard`), or a store that
   *   streams them (sliding window).
   * @throws RangeError when the weights do not match the plan or `layersPerGraph` is not a whole number ≥ 0;
   *   RuntimeError when ORT refuses a graph.
   */
  static async create(
    plan: TensorParallelPlan,
    shardIndex: number,
    weights: readonly LayerShardWeights[] | WeightStore,
    options: ShardRunnerOptions = {},
  ): Promise<ShardRunner> {
    const perGraph = options.layersPerGraph ?? Number.POSITIVE_INFINITY
    if (options.layersPerGraph !== undefined && (!Number.isInteger(perGraph) || perGraph < 0)) {
      throw new RangeError(`cannot put ${perGraph} layers in a graph: need a whole number ≥ 0`)
    }
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
      // Resident: sessions with the weights baked in as initializers (ORT pre-packs them; MatMulNBits is ~400× slower
      // with B as an input). Our copies are dropped once ORT holds its own.
      const attention: (Session | null)[] = Array.from({ length: plan.layers.start }, () => null)
      const ffn: (Session | null)[] = Array.from({ length: plan.layers.start }, () => null)
      const end = plan.layers.start + plan.layers.count
      if (perGraph > 0 && plan.shards.length === 1 && attentionShape && ffnShape && attentionKernel(m.headDim) === 'gqa') {
        // No allreduce partner: whole layers per graph, as few graphs as the count and bytes limits allow.
        const feedsOf = async (layer: number): Promise<Record<string, HostTensor>> => ({
          ...attentionWeightFeeds(await store.attention(layer)),
          ...ffnWeightFeeds(await store.ffn(layer)),
        })
        const layerBytes: number[] = []
        for (let layer = plan.layers.start; layer < end; layer++) {
          layerBytes.push(Object.values(await feedsOf(layer)).reduce((sum, t) => sum + t.data.byteLength, 0))
        }
        const groups: LayerGroup[] = []
        let first = plan.layers.start
        for (const count of layerGroupSizes(layerBytes, perGraph, MAX_GRAPH_WEIGHT_BYTES)) {
          const constants: GraphConstants[] = []
          for (let layer = first; layer < first + count; layer++) constants.push(asConstants(await feedsOf(layer)))
          const name = count === 1 ? `layer ${first}` : `layers ${first}-${first + count - 1}`
          groups.push({ session: await Session.create(name, buildDecoderLayers(attentionShape, ffnShape, constants), options), first, count })
          first += count
        }
        await store.close()
        return new ShardRunner(plan, shard, null, window, attention, ffn, groups)
      }
      for (let layer = plan.layers.start; layer < end; layer++) {
        attention.push(
          attentionShape
            ? await Session.create(`attention ${layer}`, buildAttentionBlock(attentionShape, asConstants(attentionWeightFeeds(await store.attention(layer)))), options)
            : null,
        )
        ffn.push(ffnShape ? await Session.create(`ffn ${layer}`, buildFfnBlock(ffnShape, asConstants(ffnWeightFeeds(await store.ffn(layer)))), options) : null)
      }
      await store.close()
      return new ShardRunner(plan, shard, null, window, attention, ffn, null)
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
    return new ShardRunner(plan, shard, store, window, layers.map(() => attention), layers.map(() => ffn), null, rowsPerRun)
  }

  /** Positions held in the KV cache. */
  get cachedLength(): number {
    return this.#cachedLen
  }

  /** Forgets the KV cache: the next forward starts a sequence at position 0. */
  reset(): void {
    this.#pastK = this.#pastK.map(() => new Float32Array(0))
    this.#pastV = this.#pastV.map(() => new Float32Array(0))
    this.#capacity = 0
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
   *   weights, `weights` (I/O) spans, plus one `forward` span around them; whole-layer graphs record one `layers`
   *   (compute) span per graph instead of the per-block spans.
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
    const rows = (t: Float32Array, cols: number): HostTensor => ({ data: t, dims: [t.length / cols, cols] })
    const now = performance.now.bind(performance)
    if (this.#kernel === 'gqa') this.#reserve(total)
    const whole = this.#positionFeeds(pos0, seq)
    if (this.#groups) return this.#forwardLayers(x, whole.positions, whole.pastDims, step, timings, tracer)

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
          const { positions, pastDims } = n === seq ? whole : this.#positionFeeds(p0, n)
          const out = await attention.run({
            x: n === seq ? rows(x, m.dim) : { data: x.subarray(r0 * m.dim, (r0 + n) * m.dim), dims: [n, m.dim] },
            ...positions,
            past_k: { data: this.#pastK[layer]!, dims: pastDims },
            past_v: { data: this.#pastV[layer]!, dims: pastDims },
            ...weights,
          })
          if (this.#kernel === 'gqa') this.#append(layer, out.new_k!.data as Float32Array, out.new_v!.data as Float32Array, p0, n)
          else {
            this.#pastK[layer] = out.present_k!.data as Float32Array
            this.#pastV[layer] = out.present_v!.data as Float32Array
          }
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

  /**
   * Positions pos0..pos0+n-1 as the attention kernel takes them (see buildAttentionBlock), and the dims of its KV
   * cache inputs: 'gqa' `seqlens_k`, `total_sequence_length` and the whole RoPE caches, past [1, kvHeads, capacity,
   * headDim] (call {@link #reserve} first); 'ops' `cos`/`sin` rows [n, headDim], causal `mask` [n, pos0 + n], past
   * [kvHeads, pos0, headDim].
   */
  #positionFeeds(pos0: number, n: number): { positions: Record<string, HostTensor>; pastDims: number[] } {
    const m = this.plan.model
    const hd = m.headDim
    const kvHeads = this.shard.kvHeads.count
    const total = pos0 + n
    if (this.#kernel === 'gqa') {
      return {
        positions: {
          seqlens_k: { data: Int32Array.of(total - 1), dims: [1] },
          total_sequence_length: { data: Int32Array.of(total), dims: [] },
          cos_cache: { data: this.#rope.cos, dims: [m.maxSeqLen, hd / 2] },
          sin_cache: { data: this.#rope.sin, dims: [m.maxSeqLen, hd / 2] },
        },
        pastDims: [1, kvHeads, this.#capacity, hd],
      }
    }
    return {
      positions: {
        cos: { data: this.#rope.cos.subarray(pos0 * hd, total * hd), dims: [n, hd] },
        sin: { data: this.#rope.sin.subarray(pos0 * hd, total * hd), dims: [n, hd] },
        mask: { data: causalMask(n, pos0), dims: [n, total] },
      },
      pastDims: [kvHeads, pos0, hd],
    }
  }

  /**
   * Grows the 'gqa' KV buffers of the plan's layers to hold `total` positions (in steps of {@link KV_CAPACITY_STEP},
   * at most maxSeqLen), one layer at a time, keeping positions 0..cachedLen-1 of each head.
   */
  #reserve(total: number): void {
    if (total <= this.#capacity) return
    const m = this.plan.model
    const capacity = Math.min(m.maxSeqLen, Math.ceil(total / KV_CAPACITY_STEP) * KV_CAPACITY_STEP)
    const kvHeads = this.shard.kvHeads.count
    const hd = m.headDim
    const grow = (old: Float32Array): Float32Array => {
      const next = new Float32Array(kvHeads * capacity * hd) // [1, kvHeads, capacity, headDim]
      for (let h = 0; h < kvHeads; h++) {
        next.set(old.subarray(h * this.#capacity * hd, (h * this.#capacity + this.#cachedLen) * hd), h * capacity * hd)
      }
      return next
    }
    for (let layer = this.plan.layers.start; layer < this.plan.layers.start + this.plan.layers.count; layer++) {
      this.#pastK[layer] = grow(this.#pastK[layer]!)
      this.#pastV[layer] = grow(this.#pastV[layer]!)
    }
    this.#capacity = capacity
  }

  /** Writes this step's K and V of `layer` ([1, kvHeads, seq, headDim] f32 each) at positions pos0.. of its buffers. */
  #append(layer: number, newK: Float32Array, newV: Float32Array, pos0: number, seq: number): void {
    const hd = this.plan.model.headDim
    const rows = seq * hd
    for (let h = 0; h < this.shard.kvHeads.count; h++) {
      this.#pastK[layer]!.set(newK.subarray(h * rows, (h + 1) * rows), (h * this.#capacity + pos0) * hd)
      this.#pastV[layer]!.set(newV.subarray(h * rows, (h + 1) * rows), (h * this.#capacity + pos0) * hd)
    }
  }

  /** {@link forward} through whole-layer graphs: no allreduce, residual adds inside the graphs. */
  async #forwardLayers(
    x: Float32Array,
    positions: Record<string, HostTensor>,
    pastDims: number[],
    step: number,
    timings: ForwardTimings | undefined,
    tracer: Tracer | undefined,
  ): Promise<Float32Array> {
    const m = this.plan.model
    const seq = x.length / m.dim
    const now = performance.now.bind(performance)
    const forwardStart = now()
    for (const group of this.#groups!) {
      const t0 = now()
      const feeds: Record<string, HostTensor> = { x: { data: x, dims: [seq, m.dim] }, ...positions }
      for (let i = 0; i < group.count; i++) {
        feeds[`past_k_${i}`] = { data: this.#pastK[group.first + i]!, dims: pastDims }
        feeds[`past_v_${i}`] = { data: this.#pastV[group.first + i]!, dims: pastDims }
      }
      const out = await group.session.run(feeds)
      for (let i = 0; i < group.count; i++) {
        this.#append(group.first + i, out[`new_k_${i}`]!.data as Float32Array, out[`new_v_${i}`]!.data as Float32Array, this.#cachedLen, seq)
      }
      x.set(out.y!.data as Float32Array)
      if (tracer) tracer.span('layers', 'compute', t0, now(), { layer: group.first, layers: group.count, step })
    }
    this.#cachedLen += seq
    const end = now()
    if (timings) timings.computeMs += end - forwardStart
    if (tracer) tracer.span('forward', 'forward', forwardStart, end, { step, pos0: this.#cachedLen - seq, seq })
    return x
  }

  /** Releases the ORT sessions. */
  async release(): Promise<void> {
    for (const group of this.#groups ?? []) await group.session.release()
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
