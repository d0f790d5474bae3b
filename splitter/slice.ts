import type { DType } from './model.ts'
import { bf16BytesToF32, f16BytesToF32 } from './quant/ggml-blocks.ts'
import type { BlockwiseWeight } from './quant/blockwise.ts'
import { ggmlToNBits, type NBitsWeight, nbitsColumns, nbitsRows } from './quant/matmul-nbits.ts'
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

/** A dense linear weight [rows = out, cols = in] f32. */
export interface F32Weight {
  readonly bits: 32
  readonly rows: number
  readonly cols: number
  /** [rows, cols] f32 */
  readonly data: Float32Array
}

/** A linear weight [out, in] as a graph consumes it: dense f32 (Gemm) or 4/8-bit blocks (MatMulNBits). */
export type LinearWeight = F32Weight | NBitsWeight

/**
 * A linear weight as a sliding window streams it: quantized blocks are laid out for streaming
 * (splitter/quant/blockwise.ts); made only by a streaming weight store, never sliced or sent.
 */
export type StreamedLinearWeight = LinearWeight | BlockwiseWeight

/**
 * A stored tensor [rows, cols] as a linear weight: f32/f16/bf16 become f32, q4_0/q8_0 are re-laid out for
 * MatMulNBits without dequantizing.
 * @throws RangeError when the byte count does not fit the shape.
 */
export function toLinearWeight(dtype: DType, bytes: Uint8Array, rows: number, cols: number): LinearWeight {
  if (dtype === 'q4_0' || dtype === 'q8_0') return ggmlToNBits(dtype, bytes, rows, cols)
  const data =
    dtype === 'f32'
      ? bytes.byteOffset % 4 === 0
        ? new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4)
        : new Float32Array(bytes.slice().buffer)
      : dtype === 'f16'
        ? f16BytesToF32(bytes)
        : bf16BytesToF32(bytes)
  if (data.length !== rows * cols) throw new RangeError(`cannot use ${data.length} ${dtype} values as a ${rows}×${cols} weight`)
  return { bits: 32, rows, cols, data }
}

/** Output features `[start, start+count)` of a linear weight (zero-copy). */
export function linearRows(w: LinearWeight, start: number, count: number): LinearWeight {
  if (w.bits !== 32) return nbitsRows(w, start, count)
  return { bits: 32, rows: count, cols: w.cols, data: sliceRows(w.data, w.cols, start, count) }
}

/**
 * Input features `[start, start+count)` of a linear weight (copied).
 * @throws RangeError for a quantized weight when the cut is not on a 32-column block boundary.
 */
export function linearColumns(w: LinearWeight, start: number, count: number): LinearWeight {
  if (w.bits !== 32) return nbitsColumns(w, start, count)
  return { bits: 32, rows: w.rows, cols: count, data: sliceColumns(w.data, w.cols, start, count) }
}

/**
 * One peer's attention weights for one layer (see `buildAttentionBlock`); `W` is {@link StreamedLinearWeight} for
 * weights from a sliding window.
 */
export interface AttentionShardWeights<W extends StreamedLinearWeight = LinearWeight> {
  /** [dim] f32 */
  readonly attn_norm: Float32Array
  /** [heads*headDim, dim] */
  readonly wq: W
  /** [kvHeads*headDim, dim] */
  readonly wk: W
  /** [kvHeads*headDim, dim] */
  readonly wv: W
  /** [dim, heads*headDim] */
  readonly wo: W
  /** Q/K/V biases [heads*headDim], [kvHeads*headDim] ×2 f32 (Qwen2), or null. */
  readonly bias: { readonly bq: Float32Array; readonly bk: Float32Array; readonly bv: Float32Array } | null
}

/** One peer's FFN weights for one layer (see `buildFfnBlock`); `W` as for {@link AttentionShardWeights}. */
export interface FfnShardWeights<W extends StreamedLinearWeight = LinearWeight> {
  /** [dim] f32 */
  readonly ffn_norm: Float32Array
  /** gate [columns, dim] */
  readonly w1: W
  /** up [columns, dim] */
  readonly w3: W
  /** down [dim, columns] */
  readonly w2: W
}

/** A peer's weights for one layer; `null` where its plan gives it no share of that block. */
export interface LayerShardWeights {
  readonly attention: AttentionShardWeights | null
  readonly ffn: FfnShardWeights | null
}

/** Where slicing reads full model tensors from (by canonical name, shapes as in `ModelDescription`). */
export interface WeightSource {
  /** A 1-D tensor (norm weight, bias) as f32. */
  vector(name: string): Float32Array
  /** A 2-D tensor [out, in] as a linear weight. */
  linear(name: string): LinearWeight
  /**
   * Optional: output features `[start, start+count)` of a 2-D tensor, read and converted alone (equal to
   * `linearRows(linear(name), start, count)`); lets one shard cost only its share.
   */
  linearRows?(name: string, start: number, count: number): LinearWeight
  /** Optional: input features `[start, start+count)` of a 2-D tensor (equal to `linearColumns(linear(name), ...)`). */
  linearColumns?(name: string, start: number, count: number): LinearWeight
}

/**
 * Cuts one layer's weights for `shard` (Megatron-LM §3): Q/K/V by rows of whole heads, the output projection by the
 * matching columns; W1/W3 by rows, W2 by the matching columns. Norm weights are replicated.
 * @throws RangeError when a tensor's size does not match `model`, or a quantized weight would be cut inside a
 *   32-column block.
 */
export function sliceLayerShard(model: PlanModelShape, shard: ShardSpec, layer: number, source: WeightSource): LayerShardWeights {
  const { dim, headDim, nHeads, nKvHeads, hiddenDim } = model
  const vec = (suffix: string, expected: number): Float32Array => {
    const name = `blk.${layer}.${suffix}`
    const data = source.vector(name)
    if (data.length !== expected) throw new RangeError(`cannot slice ${name}: ${data.length} values, expected ${expected}`)
    return data
  }
  const lin = (suffix: string, rows: number, cols: number): LinearWeight => {
    const name = `blk.${layer}.${suffix}`
    const w = source.linear(name)
    if (w.rows !== rows || w.cols !== cols) throw new RangeError(`cannot slice ${name}: ${w.rows}×${w.cols}, expected ${rows}×${cols}`)
    return w
  }
  // Through the source's ranged reads when it has them (the result must have the shape the full cut would).
  const rowsOf = (suffix: string, rows: number, cols: number, start: number, count: number): LinearWeight => {
    if (!source.linearRows) return linearRows(lin(suffix, rows, cols), start, count)
    const name = `blk.${layer}.${suffix}`
    const w = source.linearRows(name, start, count)
    if (w.rows !== count || w.cols !== cols) throw new RangeError(`cannot slice ${name}: rows ${start}..${start + count} came as ${w.rows}×${w.cols}, expected ${count}×${cols}`)
    return w
  }
  const columnsOf = (suffix: string, rows: number, cols: number, start: number, count: number): LinearWeight => {
    if (!source.linearColumns) return linearColumns(lin(suffix, rows, cols), start, count)
    const name = `blk.${layer}.${suffix}`
    const w = source.linearColumns(name, start, count)
    if (w.rows !== rows || w.cols !== count) throw new RangeError(`cannot slice ${name}: columns ${start}..${start + count} came as ${w.rows}×${w.cols}, expected ${rows}×${count}`)
    return w
  }
  let attention: AttentionShardWeights | null = null
  if (shard.kvHeads.count > 0) {
    const q = { start: shard.heads.start * headDim, count: shard.heads.count * headDim }
    const kv = { start: shard.kvHeads.start * headDim, count: shard.kvHeads.count * headDim }
    attention = {
      attn_norm: vec('attn_norm.weight', dim),
      wq: rowsOf('attn_q.weight', nHeads * headDim, dim, q.start, q.count),
      wk: rowsOf('attn_k.weight', nKvHeads * headDim, dim, kv.start, kv.count),
      wv: rowsOf('attn_v.weight', nKvHeads * headDim, dim, kv.start, kv.count),
      wo: columnsOf('attn_output.weight', dim, nHeads * headDim, q.start, q.count),
      bias: model.qkvBias
        ? {
            bq: vec('attn_q.bias', nHeads * headDim).subarray(q.start, q.start + q.count),
            bk: vec('attn_k.bias', nKvHeads * headDim).subarray(kv.start, kv.start + kv.count),
            bv: vec('attn_v.bias', nKvHeads * headDim).subarray(kv.start, kv.start + kv.count),
          }
        : null,
    }
  }
  let ffn: FfnShardWeights | null = null
  if (shard.ffnColumns.count > 0) {
    const { start, count } = shard.ffnColumns
    ffn = {
      ffn_norm: vec('ffn_norm.weight', dim),
      w1: rowsOf('ffn_gate.weight', hiddenDim, dim, start, count),
      w3: rowsOf('ffn_up.weight', hiddenDim, dim, start, count),
      w2: columnsOf('ffn_down.weight', dim, hiddenDim, start, count),
    }
  }
  return { attention, ffn }
}
