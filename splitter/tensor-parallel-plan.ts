import { formatLayers } from './layer-range.ts'
import type { LlamaConfig } from './model.ts'

/** A half-open range of units: `[start, start + count)`. */
export interface UnitRange {
  readonly start: number
  readonly count: number
}

/** What one peer computes in every layer. Ranges index the model's heads and FFN columns. */
export interface ShardSpec {
  /** Position in `plan.shards`; shard 0 is the master. */
  readonly index: number
  /** KV heads owned (GQA: whole KV heads with all their query heads); count 0 = no attention share. */
  readonly kvHeads: UnitRange
  /** Query heads owned: `kvHeads` scaled by nHeads / nKvHeads. */
  readonly heads: UnitRange
  /** SwiGLU columns owned (rows of W1/W3, columns of W2); count 0 = no FFN share. */
  readonly ffnColumns: UnitRange
}

/** The model shape a plan was made for; a peer refuses weights that do not fit it. */
export interface PlanModelShape {
  readonly dim: number
  readonly hiddenDim: number
  readonly nLayers: number
  readonly nHeads: number
  readonly nKvHeads: number
  readonly headDim: number
  readonly normEps: number
  readonly ropeTheta: number
  readonly ropeStyle: 'adjacent' | 'halves'
  readonly maxSeqLen: number
  readonly qkvBias: boolean
}

/**
 * A serialisable tensor-parallel plan (plain data: it travels to every peer in the `plan` frame).
 *
 * Per layer every peer runs its attention share, then sync point `attention` (allreduce of the output-projection
 * partial sums), then its FFN share, then sync point `ffn` (allreduce of the down-projection partial sums): two
 * allreduces per layer, as TPI-LLM §3.1 and Megatron-LM §3.
 */
export interface TensorParallelPlan {
  readonly kind: 'tensor-parallel'
  readonly version: 1
  readonly model: PlanModelShape
  /**
   * Decoder layers the plan's peers run: [layers.start, layers.start + layers.count). All layers for a pure
   * tensor-parallel plan; one stage's range in a pipeline or hybrid plan (the other stages run the rest).
   */
  readonly layers: UnitRange
  /** Granularity of FFN shares in columns (1 for f32/f16; the quantization block for Q4_0/Q8_0). */
  readonly ffnBlock: number
  readonly shards: readonly ShardSpec[]
  /** Allreduces of one layer, in order. */
  readonly syncPoints: readonly ['attention', 'ffn']
  /** Activations of quantized matmuls on every peer: 'exact' f32 or 'int8' blocks (llama.cpp's arithmetic). */
  readonly quantizedMatmul: 'exact' | 'int8'
}

/** Options of {@link planTensorParallel}. */
export interface TensorParallelOptions {
  /**
   * Relative speed of each peer (index 0 = master), e.g. measured GB/s; shares follow it. Default: equal.
   * Must be finite and > 0, one per peer.
   */
  readonly weights?: readonly number[]
  /** FFN share granularity in columns; must divide hiddenDim. Default 1 (32 when W2 is block-quantized). */
  readonly ffnBlock?: number
  /**
   * Column granularity of the attention output projection's input: every peer's head range times headDim must be a
   * multiple of it. Default 1 (32 when Wo is block-quantized).
   */
  readonly attentionBlock?: number
  /** See `TensorParallelPlan.quantizedMatmul`. Default 'exact'. */
  readonly quantizedMatmul?: 'exact' | 'int8'
  /** Layers the plan covers (a pipeline stage's range). Default: all layers. */
  readonly layers?: UnitRange
}

/**
 * Splits `total` units over peers in proportion to `weights` by the largest-remainder method; ties go to the lower
 * index. Pure.
 * @returns counts per peer, summing to `total`.
 */
export function proportionalShares(total: number, weights: readonly number[]): number[] {
  const sum = weights.reduce((a, b) => a + b, 0)
  const exact = weights.map((w) => (total * w) / sum)
  const counts = exact.map(Math.floor)
  let left = total - counts.reduce((a, b) => a + b, 0)
  const order = exact.map((e, i) => ({ i, r: e - Math.floor(e) })).sort((a, b) => b.r - a.r || a.i - b.i)
  for (const { i } of order) {
    if (left === 0) break
    counts[i]! += 1
    left -= 1
  }
  return counts
}

function toRanges(counts: readonly number[], scale: number): UnitRange[] {
  let start = 0
  return counts.map((c) => {
    const r = { start: start * scale, count: c * scale }
    start += c
    return r
  })
}

/**
 * Plans tensor parallelism of a Llama decoder over `nPeers` peers (peer 0 is the master).
 *
 * KV heads are dealt in whole units (a peer owns a KV head and its nHeads/nKvHeads query heads, so GQA needs no KV
 * replication); when there are more peers than KV heads the extra peers get no attention share and work on the FFN
 * only. FFN columns are dealt in blocks of `ffnBlock`. Shares follow `weights` (uneven devices get uneven shares).
 *
 * @throws RangeError naming the numbers when nPeers < 1, the head counts do not group, `ffnBlock` does not divide
 *   hiddenDim, there are more peers than FFN blocks, or `weights` are malformed. Nothing is dialled before this.
 */
export function planTensorParallel(config: LlamaConfig, nPeers: number, options: TensorParallelOptions = {}): TensorParallelPlan {
  if (!Number.isInteger(nPeers) || nPeers < 1) throw new RangeError(`cannot plan tensor parallelism over ${nPeers} peers: need a whole number ≥ 1`)
  const { nHeads, nKvHeads, hiddenDim } = config
  if (nKvHeads < 1 || nHeads % nKvHeads !== 0) {
    throw new RangeError(`cannot plan: ${nHeads} query heads do not group evenly over ${nKvHeads} KV heads`)
  }
  const ffnBlock = options.ffnBlock ?? 1
  if (!Number.isInteger(ffnBlock) || ffnBlock < 1 || hiddenDim % ffnBlock !== 0) {
    throw new RangeError(`cannot split FFN width ${hiddenDim} in blocks of ${ffnBlock}: the block must divide the width`)
  }
  const ffnUnits = hiddenDim / ffnBlock
  if (nPeers > ffnUnits) {
    throw new RangeError(`cannot split FFN width ${hiddenDim} (${ffnUnits} blocks of ${ffnBlock}) over ${nPeers} peers: at most ${ffnUnits}`)
  }
  const weights = options.weights ?? Array.from({ length: nPeers }, () => 1)
  if (weights.length !== nPeers || weights.some((w) => !Number.isFinite(w) || w <= 0)) {
    throw new RangeError(`cannot plan with weights [${weights.join(', ')}]: need ${nPeers} finite values > 0`)
  }
  const group = nHeads / nKvHeads
  const kvCounts = proportionalShares(nKvHeads, weights)
  const ffnCounts = proportionalShares(ffnUnits, weights)
  const kv = toRanges(kvCounts, 1)
  const ffn = toRanges(ffnCounts, ffnBlock)
  const shards: ShardSpec[] = kv.map((k, index) => ({
    index,
    kvHeads: k,
    heads: { start: k.start * group, count: k.count * group },
    ffnColumns: ffn[index]!,
  }))
  const layers = options.layers ?? { start: 0, count: config.nLayers }
  if (!Number.isInteger(layers.start) || !Number.isInteger(layers.count) || layers.start < 0 || layers.count < 1 || layers.start + layers.count > config.nLayers) {
    throw new RangeError(`cannot plan ${formatLayers(layers.start, layers.count)}: the model has ${formatLayers(0, config.nLayers)}`)
  }
  const attentionBlock = options.attentionBlock ?? 1
  for (const s of shards) {
    const start = s.heads.start * config.headDim
    const count = s.heads.count * config.headDim
    if (start % attentionBlock !== 0 || count % attentionBlock !== 0) {
      throw new RangeError(
        `cannot give peer ${s.index} query heads ${s.heads.start}..${s.heads.start + s.heads.count} (columns ${start}..${start + count} ` +
          `of the output projection): not on a ${attentionBlock}-column quantization block boundary`,
      )
    }
  }
  return {
    kind: 'tensor-parallel',
    version: 1,
    model: {
      dim: config.dim,
      hiddenDim,
      nLayers: config.nLayers,
      nHeads,
      nKvHeads,
      headDim: config.headDim,
      normEps: config.normEps,
      ropeTheta: config.ropeTheta,
      ropeStyle: config.ropeStyle,
      maxSeqLen: config.maxSeqLen,
      qkvBias: config.qkvBias ?? false,
    },
    layers: { start: layers.start, count: layers.count },
    ffnBlock,
    shards,
    syncPoints: ['attention', 'ffn'],
    quantizedMatmul: options.quantizedMatmul ?? 'exact',
  }
}
