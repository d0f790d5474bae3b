/**
 * Checks, before any process starts, that every device's memory budget can run its part of a cluster plan the way the
 * runtime will: a worker refuses a plan whose RoPE tables ([maxSeqLen, headDim] f32, cos and sin) take more than a
 * quarter of its budget (agent/shard-intake.ts), and a peer whose share does not fit its budget resident streams it
 * from disk through a window of at least 2 blocks besides the KV cache and its kernels' workspace
 * (agent/weight-store.ts `streamingNeeds`). The block sizes are
 * those of the shard file: per layer an attention block (attn_norm, Wq, Wk, Wv, Wo, biases) and an FFN block (ffn_norm,
 * W1, W3, W2), each tensor 8-byte aligned, quantized weights as MatMulNBits blob + f32 scales. Pure.
 */
import type { ClusterPlan, DType, ModelDescription, ShardSpec, TensorParallelPlan } from '../splitter/index.ts'
import { tensorBodyBytes, type WeightName } from './protocol.ts'
import { kvCacheBytes } from './shard-encoding.ts'
import { describeStreamingNeeds, MemoryBudgetError, streamingNeeds, type TensorShape } from './weight-store.ts'

/** A worker's plan is refused when its RoPE tables need more than this fraction of its memory (shard-intake.ts). */
const TABLE_MEMORY_FRACTION = 1 / 4

/** A device as the check sees it: its name for messages and its budget (undefined: unknown, not checked). */
export interface BudgetedDevice {
  readonly name: string
  readonly budgetBytes: number | undefined
}

/** What one device's share needs, bytes. */
export interface ShareNeeds {
  /** RoPE cos and sin tables at the plan's context. */
  readonly ropeBytes: number
  /** Every block of the share, as the shard file stores them. */
  readonly weightBytes: number
  /** The largest block, as the shard file stores it. */
  readonly largestBlockBytes: number
  /** The tensors of each block (for {@link streamingNeeds}). */
  readonly blocks: readonly (readonly TensorShape[])[]
  /** The KV cache at the full context (agent/shard-encoding.ts). */
  readonly kvCacheBytes: number
}

const align8 = (n: number): number => Math.ceil(n / 8) * 8

function bitsOf(dtype: DType | undefined): 32 | 8 | 4 {
  return dtype === 'q4_0' ? 4 : dtype === 'q8_0' ? 8 : 32
}

/** Bytes of one block in the shard file: tensors one after another, each starting 8-byte aligned. */
function blockBytes(tensors: readonly { bits: 32 | 8 | 4; rows: number; cols: number }[]): number {
  let bytes = 0
  for (const t of tensors) bytes = align8(bytes) + tensorBodyBytes(t.bits, t.rows, t.cols)
  return bytes
}

/** What shard `shard` of the stage plan `tp` needs of its device's memory. */
export function shareNeeds(model: ModelDescription, tp: TensorParallelPlan, shard: ShardSpec): ShareNeeds {
  const m = tp.model
  const bits = (layer: number, name: string): 32 | 8 | 4 => bitsOf(model.tensors.get(`blk.${layer}.${name}.weight`)?.dtype)
  const vector = (n: number): { bits: 32; rows: number; cols: number } => ({ bits: 32, rows: 1, cols: n })
  const q = shard.heads.count * m.headDim
  const kv = shard.kvHeads.count * m.headDim
  let weightBytes = 0
  let largestBlockBytes = 0
  const shareBlocks: TensorShape[][] = []
  for (let layer = tp.layers.start; layer < tp.layers.start + tp.layers.count; layer++) {
    const blocks: { name: WeightName; bits: 32 | 8 | 4; rows: number; cols: number }[][] = []
    if (shard.kvHeads.count > 0) {
      blocks.push([
        { name: 'attn_norm', ...vector(m.dim) },
        { name: 'wq', bits: bits(layer, 'attn_q'), rows: q, cols: m.dim },
        { name: 'wk', bits: bits(layer, 'attn_k'), rows: kv, cols: m.dim },
        { name: 'wv', bits: bits(layer, 'attn_v'), rows: kv, cols: m.dim },
        { name: 'wo', bits: bits(layer, 'attn_output'), rows: m.dim, cols: q },
        ...(m.qkvBias ? [{ name: 'bq' as const, ...vector(q) }, { name: 'bk' as const, ...vector(kv) }, { name: 'bv' as const, ...vector(kv) }] : []),
      ])
    }
    if (shard.ffnColumns.count > 0) {
      const n = shard.ffnColumns.count
      blocks.push([
        { name: 'ffn_norm', ...vector(m.dim) },
        { name: 'w1', bits: bits(layer, 'ffn_gate'), rows: n, cols: m.dim },
        { name: 'w3', bits: bits(layer, 'ffn_up'), rows: n, cols: m.dim },
        { name: 'w2', bits: bits(layer, 'ffn_down'), rows: m.dim, cols: n },
      ])
    }
    for (const block of blocks) {
      const bytes = blockBytes(block)
      // Blocks start 64-byte aligned in the file, but their size is what a window slot holds.
      weightBytes += bytes
      largestBlockBytes = Math.max(largestBlockBytes, bytes)
      shareBlocks.push(block)
    }
  }
  return { ropeBytes: 2 * m.maxSeqLen * m.headDim * 4, weightBytes, largestBlockBytes, blocks: shareBlocks, kvCacheBytes: kvCacheBytes(tp, shard.index) }
}

/**
 * Checks every device of `plan` whose budget is known (device 0 = the master, which holds no RoPE limit of a worker).
 * @param prefix - put before the message, e.g. `plan file p.json: `
 * @throws MemoryBudgetError naming the device and the bytes its budget would need
 */
export function checkPlanFits(model: ModelDescription, plan: ClusterPlan, devices: readonly BudgetedDevice[], prefix = ''): void {
  for (const stage of plan.stages) {
    for (const [i, d] of stage.devices.entries()) {
      const budget = devices[d]?.budgetBytes
      if (budget === undefined) continue
      const who = `${devices[d]!.name} (device ${d})`
      const needs = shareNeeds(model, stage.tensorParallel, stage.tensorParallel.shards[i]!)
      if (d > 0 && needs.ropeBytes > budget * TABLE_MEMORY_FRACTION) {
        const needed = Math.ceil(needs.ropeBytes / TABLE_MEMORY_FRACTION)
        throw new MemoryBudgetError(
          `${prefix}memory budget of ${budget} bytes on ${who} is too small: its RoPE tables for a context of ${stage.tensorParallel.model.maxSeqLen} ` +
            `× head size ${stage.tensorParallel.model.headDim} need ${needs.ropeBytes} bytes, at most a quarter of the budget: needs ${needed}`,
          needed,
        )
      }
      // A share that fits stays resident; one that does not streams through a window of at least 2 blocks.
      if (needs.weightBytes + needs.kvCacheBytes <= budget) continue
      const streaming = streamingNeeds(needs.blocks, needs.kvCacheBytes, stage.tensorParallel.quantizedMatmul)
      if (streaming.neededBytes > budget) {
        throw new MemoryBudgetError(
          `${prefix}memory budget of ${budget} bytes on ${who} is too small: needs ${streaming.neededBytes} ` +
            `(${describeStreamingNeeds(streaming, ` at ${stage.tensorParallel.model.maxSeqLen} positions`)})`,
          streaming.neededBytes,
        )
      }
    }
  }
}
