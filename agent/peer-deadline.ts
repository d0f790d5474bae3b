/**
 * How long a peer may stay silent before it is treated as stalled.
 *
 * The rule: `deadline(seq) = base + seq × perPositionMs`, where `base` is `--peer-deadline` (default 2000 ms) and
 * `perPositionMs` is the arithmetic of the model's largest half-layer block (attention at the sequence's end, or the
 * SwiGLU FFN) for one position, timed at {@link SLOW_DEVICE_FLOPS_PER_MS} (1 GFLOP/s, below any device edgeshard
 * targets, a Raspberry Pi 4 included). A decode step (seq 1) therefore gets about `base`; a prefill gets in addition
 * the time a slow device would take to run one whole block of it, the longest a healthy peer stays silent (onnxruntime
 * runs a block on the event loop's thread, so no frame can leave during it). stories260K adds 0.07 ms per position;
 * TinyLlama-1.1B adds 69 ms per position (a 128-token prompt: base + 8.9 s).
 */

/** The arithmetic rate of the slowest device the deadline allows for, FLOP per ms (1 GFLOP/s). */
export const SLOW_DEVICE_FLOPS_PER_MS = 1e6

/** Default `--peer-deadline`, ms. */
export const DEFAULT_PEER_DEADLINE_MS = 2000

/** Default interval of worker heartbeats (a `ping` when nothing else was sent for that long), ms. */
export const DEFAULT_HEARTBEAT_MS = 500

/** The model dimensions the rule needs (a TensorParallelPlan's `model` or a LlamaConfig fits). */
export interface DeadlineModelShape {
  readonly dim: number
  readonly hiddenDim: number
  readonly nHeads: number
  readonly nKvHeads: number
  readonly headDim: number
}

/**
 * FLOPs of the model's largest half-layer block for one position attending to `contextEnd` positions: attention
 * (Q/K/V and output projections, scores and weighted values over the context) or the SwiGLU FFN (three matmuls).
 */
export function blockFlopsPerPosition(model: DeadlineModelShape, contextEnd: number): number {
  const q = model.nHeads * model.headDim
  const kv = model.nKvHeads * model.headDim
  const attention = 2 * model.dim * (q + 2 * kv) + 2 * q * model.dim + 4 * q * Math.max(1, contextEnd)
  const ffn = 6 * model.dim * model.hiddenDim
  return Math.max(attention, ffn)
}

/**
 * The deadline of one step over `seq` positions ending at position `contextEnd` (pos0 + seq), ms: `baseMs` plus the
 * time {@link SLOW_DEVICE_FLOPS_PER_MS} takes for one block of it (see the module comment).
 * @throws RangeError for a base that is not a positive finite number or a seq below 1
 */
export function stepDeadlineMs(baseMs: number, model: DeadlineModelShape, seq: number, contextEnd = seq): number {
  if (!Number.isFinite(baseMs) || baseMs <= 0) throw new RangeError(`peer deadline must be a positive number of ms, got ${baseMs}`)
  if (!Number.isInteger(seq) || seq < 1) throw new RangeError(`cannot time a step of ${seq} positions`)
  return baseMs + (seq * blockFlopsPerPosition(model, contextEnd)) / SLOW_DEVICE_FLOPS_PER_MS
}
