import type { PlanModelShape, ShardSpec } from './tensor-parallel-plan.ts'

/**
 * Rows `[start, start + count)` of a row-major matrix with `nCols` columns: a zero-copy view.
 * @throws RangeError when the range is outside the matrix.
 */
export function sliceRows(matrix: Float32Array, nCols: number, start: number, count: number): Float32Array {
  const nRows = matrix.length / nCols
  if (!Number.isInteger(nRows) || start < 0 || count < 0 || start + count > nRows) {
    throw new RangeError(`cannot take rows ${start}..${start + count} of a ${nRows}×${nCols} matrix`)
  }
  return matrix.subarray(start * nCols, (start + count) * nCols)
}

/**
 * Columns `[start, start + count)` of a row-major matrix with `nCols` columns, copied into a new
 * `[nRows, count]` matrix.
 * @throws RangeError when the range is outside the matrix.
 */
export function sliceColumns(matrix: Float32Array, nCols: number, start: number, count: number): Float32Array {
  const nRows = matrix.length / nCols
  if (!Number.isInteger(nRows) || start < 0 || count < 0 || start + count > nCols) {
    throw new RangeError(`cannot take columns ${start}..${start + count} of a ${nRows}×${nCols} matrix`)
  }
  const out = new Float32Array(nRows * count)
  for (let r = 0; r < nRows; r++) out.set(matrix.subarray(r * nCols + start, r * nCols + start + count), r * count)
  return out
}

/** One peer's attention weights for one layer (graph input names of `buildAttentionBlock`), f32. */
export interface AttentionShardWeights {
  /** [dim] */
  readonly attn_norm: Float32Array
  /** [heads*headDim, dim] */
  readonly wq: Float32Array
  /** [kvHeads*headDim, dim] */
  readonly wk: Float32Array
  /** [kvHeads*headDim, dim] */
  readonly wv: Float32Array
  /** [dim, heads*headDim] */
  readonly wo: Float32Array
}

/** One peer's FFN weights for one layer (graph input names of `buildFfnBlock`), f32. */
export interface FfnShardWeights {
  /** [dim] */
  readonly ffn_norm: Float32Array
  /** gate [columns, dim] */
  readonly w1: Float32Array
  /** up [columns, dim] */
  readonly w3: Float32Array
  /** down [dim, columns] */
  readonly w2: Float32Array
}

/** A peer's weights for one layer; `null` where its plan gives it no share of that block. */
export interface LayerShardWeights {
  readonly attention: AttentionShardWeights | null
  readonly ffn: FfnShardWeights | null
}

/**
 * Cuts one layer's weights for `shard` (Megatron-LM §3): Q/K/V by rows of whole heads, the output projection by the
 * matching columns; W1/W3 by rows, W2 by the matching columns. Norm weights are replicated.
 *
 * @param tensor returns a full model tensor by canonical name (`blk.{layer}.attn_q.weight`, …) as f32, shaped as
 *   in `ModelDescription`.
 * @throws RangeError when a tensor's size does not match `model`.
 */
export function sliceLayerShard(
  model: PlanModelShape,
  shard: ShardSpec,
  layer: number,
  tensor: (name: string) => Float32Array,
): LayerShardWeights {
  const { dim, headDim, nHeads, nKvHeads, hiddenDim } = model
  const t = (suffix: string, expected: number): Float32Array => {
    const name = `blk.${layer}.${suffix}`
    const data = tensor(name)
    if (data.length !== expected) throw new RangeError(`cannot slice ${name}: ${data.length} values, expected ${expected}`)
    return data
  }
  let attention: AttentionShardWeights | null = null
  if (shard.kvHeads.count > 0) {
    const { heads, kvHeads } = shard
    attention = {
      attn_norm: t('attn_norm.weight', dim),
      wq: sliceRows(t('attn_q.weight', nHeads * headDim * dim), dim, heads.start * headDim, heads.count * headDim),
      wk: sliceRows(t('attn_k.weight', nKvHeads * headDim * dim), dim, kvHeads.start * headDim, kvHeads.count * headDim),
      wv: sliceRows(t('attn_v.weight', nKvHeads * headDim * dim), dim, kvHeads.start * headDim, kvHeads.count * headDim),
      wo: sliceColumns(t('attn_output.weight', dim * nHeads * headDim), nHeads * headDim, heads.start * headDim, heads.count * headDim),
    }
  }
  let ffn: FfnShardWeights | null = null
  if (shard.ffnColumns.count > 0) {
    const { start, count } = shard.ffnColumns
    ffn = {
      ffn_norm: t('ffn_norm.weight', dim),
      w1: sliceRows(t('ffn_gate.weight', hiddenDim * dim), dim, start, count),
      w3: sliceRows(t('ffn_up.weight', hiddenDim * dim), dim, start, count),
      w2: sliceColumns(t('ffn_down.weight', dim * hiddenDim), hiddenDim, start, count),
    }
  }
  return { attention, ffn }
}
