/**
 * What a worker accepts from a master for one plan ("hostile and broken input"): the plan itself (every field
 * typed and bounded, shares consistent, tables that fit this device, a known wire dtype), then exactly the `tensor` frames the plan gives
 * this shard (layer, name, shape, bits and body size, each once), then `load-done` with that count; and `ar` frames
 * shaped [seq, dim] in a known dtype. Anything else is a ProtocolError naming the frame, the field and what was
 * expected, checked before the frame is used, so a hostile or broken master cannot make the worker allocate more
 * than the bytes it actually sends.
 */
import { totalmem } from 'node:os'
import { formatLayers, type TensorParallelPlan } from '../splitter/index.ts'
import { type Frame, WIRE_DTYPES, type WireDtype } from '../transport/index.ts'
import { type MasterMessage, ProtocolError, tensorBodyBytes, VECTOR_NAMES, type WeightName } from './protocol.ts'
import { MemoryBudgetError } from './weight-store.ts'

/** Bounds on a plan's model shape: far above any model edgeshard runs, far below what would exhaust memory. */
const MAX = {
  dim: 65_536,
  hiddenDim: 1 << 20,
  nLayers: 4096,
  nHeads: 4096,
  headDim: 4096,
  maxSeqLen: 1 << 22,
  shards: 4096,
} as const

/** Most onnxruntime threads a plan may ask for (each is an OS thread). */
const MAX_THREADS = 1024

/** Fraction of this device's memory the plan's fixed tables (RoPE cos/sin at the full context) may take. */
const TABLE_MEMORY_FRACTION = 1 / 4

type Shape = { readonly rows: number; readonly cols: number }
type TensorMessage = Extract<MasterMessage, { type: 'tensor' }>

/**
 * The checks of one plan's shard load. Create it when the `plan` frame arrives (that checks the plan), then call
 * `tensor` for every `tensor` frame and `loadDone` for `load-done`.
 */
export class ShardIntake {
  readonly plan: TensorParallelPlan
  readonly shardIndex: number
  /** Element type of the allreduce tensors this worker sends for the plan (the `plan` frame's `wireDtype`). */
  readonly wireDtype: WireDtype
  /** Shape of every weight this shard gets, per layer of the plan's range. */
  readonly #shapes: ReadonlyMap<WeightName, Shape>
  readonly #seen = new Set<string>()

  /**
   * @param options.memoryBytes - memory the plan's fixed tables must fit in (a quarter of it): the agent's memory
   *   budget, default this device's total memory
   * @param options.threads - onnxruntime threads the `plan` frame asks for (at most 1024)
   * @param options.wireDtype - the `plan` frame's `wireDtype` as received: absent (f32), `f32` or `f16`
   * @throws ProtocolError naming the plan field and what was expected; MemoryBudgetError when the plan's RoPE tables
   *   take more than a quarter of `memoryBytes`
   */
  constructor(plan: TensorParallelPlan, shardIndex: number, options: { memoryBytes?: number; threads?: number; wireDtype?: unknown } = {}) {
    if (options.threads !== undefined && options.threads > MAX_THREADS) {
      throw new ProtocolError(`frame plan: threads must be at most ${MAX_THREADS}, got ${options.threads}`)
    }
    const wireDtype = options.wireDtype === undefined ? 'f32' : options.wireDtype
    if (!WIRE_DTYPES.includes(wireDtype as WireDtype)) {
      throw new ProtocolError(`frame plan: wireDtype must be ${WIRE_DTYPES.join(' or ')}, got ${short(wireDtype)}`)
    }
    checkPlan(plan, options.memoryBytes ?? totalmem())
    this.plan = plan
    this.shardIndex = shardIndex
    this.wireDtype = wireDtype as WireDtype
    this.#shapes = shardShapes(plan, shardIndex)
  }

  /** Tensor frames the plan gives this shard: weights per layer × layers. */
  get expectedTensors(): number {
    return this.#shapes.size * this.plan.layers.count
  }

  /**
   * Checks a `tensor` frame against the plan before its body is used, and records it.
   * @param bodyBytes - the frame's body length, bytes
   * @throws ProtocolError for a layer outside the plan, a weight this shard does not get, a shape other than the
   *   plan's, f32-only vectors in other bits, a body of the wrong size, or a weight sent twice
   */
  tensor(msg: TensorMessage, bodyBytes: number): void {
    const { layer, name, bits, rows, cols } = msg
    const { start, count } = this.plan.layers
    if (layer < start || layer >= start + count) {
      throw new ProtocolError(`frame tensor: layer ${layer} is outside the plan's ${formatLayers(start, count)}`)
    }
    const shape = this.#shapes.get(name)
    if (shape === undefined) {
      throw new ProtocolError(`frame tensor: shard ${this.shardIndex} gets no weight ${name} (it gets ${[...this.#shapes.keys()].join(', ') || 'none'})`)
    }
    if (rows !== shape.rows || cols !== shape.cols) {
      throw new ProtocolError(`frame tensor: ${name} of layer ${layer} is ${rows}×${cols}, the plan gives shard ${this.shardIndex} ${shape.rows}×${shape.cols}`)
    }
    if (VECTOR_NAMES.has(name) && bits !== 32) throw new ProtocolError(`frame tensor: ${name} is a vector, sent as f32 (bits 32), got bits ${bits}`)
    const expected = tensorBodyBytes(bits, rows, cols)
    if (bodyBytes !== expected) {
      throw new ProtocolError(`frame tensor: ${name} of layer ${layer} has a ${bodyBytes}-byte body, ${rows}×${cols} at ${bits} bits needs ${expected}`)
    }
    const key = `${layer}:${name}`
    if (this.#seen.has(key)) throw new ProtocolError(`frame tensor: ${name} of layer ${layer} was sent twice`)
    this.#seen.add(key)
  }

  /** @throws ProtocolError unless every tensor of the plan arrived and `announced` says so */
  loadDone(announced: number): void {
    const expected = this.expectedTensors
    if (this.#seen.size !== expected || announced !== expected) {
      throw new ProtocolError(`frame load-done: announces ${announced} tensors after ${this.#seen.size}, the plan gives shard ${this.shardIndex} ${expected}`)
    }
  }
}

/**
 * Checks an `ar` (allreduce sum) frame from the hub before it is used: an integer tag, dtype f32 (absent) or f16, a
 * body of [seq, dim] values with 1 ≤ seq ≤ the context.
 * @param plan - the loaded shard's plan; undefined before a shard is loaded (an `ar` frame is then refused)
 * @throws ProtocolError naming what does not match
 */
export function checkAllreduceFrame(frame: Frame, plan: TensorParallelPlan | undefined): void {
  if (plan === undefined) throw new ProtocolError('frame ar: no shard is loaded, nothing to allreduce')
  const { tag, dtype } = frame.header
  if (typeof tag !== 'number' || !Number.isSafeInteger(tag) || tag < 0) throw new ProtocolError(`frame ar: tag must be an integer ≥ 0, got ${short(tag)}`)
  if (dtype !== undefined && dtype !== 'f32' && dtype !== 'f16') throw new ProtocolError(`frame ar: dtype must be f32 or f16, got ${short(dtype)}`)
  const rowBytes = plan.model.dim * (dtype === 'f16' ? 2 : 4)
  const bytes = frame.body.byteLength
  const seq = bytes / rowBytes
  if (!Number.isInteger(seq) || seq < 1 || seq > plan.model.maxSeqLen) {
    throw new ProtocolError(`frame ar: a ${bytes}-byte body is not [seq, ${plan.model.dim}] ${dtype ?? 'f32'} with 1 ≤ seq ≤ ${plan.model.maxSeqLen}`)
  }
}

/**
 * Checks a `forward` frame before it is queued: a loaded shard, positions pos0..pos0+seq-1 inside the context, a
 * step whose allreduce tags stay exact integers (tag = (step × nLayers + layer) × 2 + phase), and a body of
 * [seq, dim] f32.
 * @throws ProtocolError naming what does not match
 */
export function checkForwardFrame(msg: { step: number; pos0: number; seq: number }, bodyBytes: number, plan: TensorParallelPlan | undefined): void {
  if (plan === undefined) throw new ProtocolError('frame forward: no shard is loaded')
  const { dim, maxSeqLen, nLayers } = plan.model
  if (msg.pos0 + msg.seq > maxSeqLen) throw new ProtocolError(`frame forward: positions ${msg.pos0}..${msg.pos0 + msg.seq - 1} pass the context of ${maxSeqLen}`)
  const maxStep = Math.floor((Number.MAX_SAFE_INTEGER - 1) / (2 * nLayers)) - 1
  if (msg.step > maxStep) throw new ProtocolError(`frame forward: step ${msg.step} is over ${maxStep} (allreduce tags would not be exact)`)
  if (bodyBytes !== msg.seq * dim * 4) throw new ProtocolError(`frame forward: a ${bodyBytes}-byte body for seq ${msg.seq}, expected [${msg.seq}, ${dim}] f32 = ${msg.seq * dim * 4} bytes`)
}

/** The weights shard `shardIndex` gets in every layer and their [rows, cols] (as `sliceLayerShard` cuts them). */
function shardShapes(plan: TensorParallelPlan, shardIndex: number): ReadonlyMap<WeightName, Shape> {
  const { dim, headDim, qkvBias } = plan.model
  const shard = plan.shards[shardIndex]!
  const q = shard.heads.count * headDim
  const kv = shard.kvHeads.count * headDim
  const f = shard.ffnColumns.count
  const shapes = new Map<WeightName, Shape>()
  if (shard.kvHeads.count > 0) {
    shapes.set('attn_norm', { rows: 1, cols: dim })
    shapes.set('wq', { rows: q, cols: dim })
    shapes.set('wk', { rows: kv, cols: dim })
    shapes.set('wv', { rows: kv, cols: dim })
    shapes.set('wo', { rows: dim, cols: q })
    if (qkvBias) {
      shapes.set('bq', { rows: 1, cols: q })
      shapes.set('bk', { rows: 1, cols: kv })
      shapes.set('bv', { rows: 1, cols: kv })
    }
  }
  if (f > 0) {
    shapes.set('ffn_norm', { rows: 1, cols: dim })
    shapes.set('w1', { rows: f, cols: dim })
    shapes.set('w3', { rows: f, cols: dim })
    shapes.set('w2', { rows: dim, cols: f })
  }
  return shapes
}

/**
 * Checks an untrusted plan field by field (parseMasterMessage checked kind, version, the shard index and the layer
 * range). @throws ProtocolError naming the field
 */
function checkPlan(plan: TensorParallelPlan, memoryBytes: number): void {
  const m = (plan.model ?? {}) as unknown as Record<string, unknown>
  const whole = (value: unknown, field: string, min: number, max: number): number => {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      throw new ProtocolError(`frame plan: ${field} must be an integer in [${min}, ${max}], got ${short(value)}`)
    }
    return value
  }
  whole(m.dim, 'model.dim', 1, MAX.dim)
  const hiddenDim = whole(m.hiddenDim, 'model.hiddenDim', 1, MAX.hiddenDim)
  whole(m.nLayers, 'model.nLayers', 1, MAX.nLayers)
  const nHeads = whole(m.nHeads, 'model.nHeads', 1, MAX.nHeads)
  const nKvHeads = whole(m.nKvHeads, 'model.nKvHeads', 1, nHeads)
  if (nHeads % nKvHeads !== 0) throw new ProtocolError(`frame plan: model.nHeads ${nHeads} is not a multiple of model.nKvHeads ${nKvHeads}`)
  const headDim = whole(m.headDim, 'model.headDim', 2, MAX.headDim)
  if (headDim % 2 !== 0) throw new ProtocolError(`frame plan: model.headDim ${headDim} is odd: RoPE rotates pairs`)
  const maxSeqLen = whole(m.maxSeqLen, 'model.maxSeqLen', 1, MAX.maxSeqLen)
  for (const field of ['normEps', 'ropeTheta'] as const) {
    const v = m[field]
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) throw new ProtocolError(`frame plan: model.${field} must be a positive number, got ${short(v)}`)
  }
  if (m.ropeStyle !== 'adjacent' && m.ropeStyle !== 'halves') throw new ProtocolError(`frame plan: model.ropeStyle must be adjacent or halves, got ${short(m.ropeStyle)}`)
  if (typeof m.qkvBias !== 'boolean') throw new ProtocolError(`frame plan: model.qkvBias must be a boolean, got ${short(m.qkvBias)}`)
  const ffnBlock = whole(plan.ffnBlock, 'ffnBlock', 1, hiddenDim)
  if (hiddenDim % ffnBlock !== 0) throw new ProtocolError(`frame plan: ffnBlock ${ffnBlock} does not divide model.hiddenDim ${hiddenDim}`)
  const sync = plan.syncPoints as unknown
  if (!Array.isArray(sync) || sync.length !== 2 || sync[0] !== 'attention' || sync[1] !== 'ffn') {
    throw new ProtocolError(`frame plan: syncPoints must be ["attention","ffn"], got ${short(sync)}`)
  }
  if (plan.quantizedMatmul !== 'exact' && plan.quantizedMatmul !== 'int8') {
    throw new ProtocolError(`frame plan: quantizedMatmul must be exact or int8, got ${short(plan.quantizedMatmul)}`)
  }
  whole(plan.shards.length, 'the number of shards', 1, MAX.shards)
  const group = nHeads / nKvHeads
  for (const [i, s] of plan.shards.entries()) {
    const shard = (s ?? {}) as unknown as Record<string, unknown>
    if (shard.index !== i) throw new ProtocolError(`frame plan: shards[${i}].index must be ${i}, got ${short(shard.index)}`)
    const range = (field: string, total: number): { start: number; count: number } => {
      const r = (shard[field] ?? {}) as Record<string, unknown>
      const start = whole(r.start, `shards[${i}].${field}.start`, 0, total)
      const count = whole(r.count, `shards[${i}].${field}.count`, 0, total - start)
      return { start, count }
    }
    const kv = range('kvHeads', nKvHeads)
    const heads = range('heads', nHeads)
    const ffn = range('ffnColumns', hiddenDim)
    if (heads.start !== kv.start * group || heads.count !== kv.count * group) {
      throw new ProtocolError(`frame plan: shards[${i}] query heads ${heads.start}+${heads.count} do not match its KV heads ${kv.start}+${kv.count} (× ${group})`)
    }
    if (ffn.start % ffnBlock !== 0 || ffn.count % ffnBlock !== 0) {
      throw new ProtocolError(`frame plan: shards[${i}] FFN columns ${ffn.start}+${ffn.count} are not on ${ffnBlock}-column blocks`)
    }
  }
  // The tables a shard runner allocates up front whatever the master sends later: RoPE cos and sin [maxSeqLen, headDim] f32.
  const tableBytes = 2 * maxSeqLen * headDim * 4
  if (tableBytes > memoryBytes * TABLE_MEMORY_FRACTION) {
    // The plan is sound; this agent's memory is what is short (a MemoryBudgetError: the master's CLI exits with 2).
    const needed = Math.ceil(tableBytes / TABLE_MEMORY_FRACTION)
    throw new MemoryBudgetError(
      `frame plan: RoPE tables for a context of ${maxSeqLen} × head size ${headDim} need ${tableBytes} bytes, more than a quarter of this agent's ${memoryBytes}: needs ${needed}`,
      needed,
    )
  }
}

/** A short JSON rendering of an untrusted value for error messages (≤ 60 characters). */
function short(value: unknown): string {
  let text: string
  try {
    text = JSON.stringify(value) ?? String(value)
  } catch {
    text = Object.prototype.toString.call(value)
  }
  return text.length > 60 ? `${text.slice(0, 57)}...` : text
}
