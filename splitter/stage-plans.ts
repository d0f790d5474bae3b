/**
 * Cluster plans of a given shape: tensor parallel, pipeline (prima.cpp-style contiguous layer ranges, one device per
 * stage) and hybrid (tensor-parallel groups chained as a pipeline), built from a layout rather than a cost model, plus
 * the check of a plan read from a file. Pure.
 */
import type { ClusterPlan, StagePlan } from './cluster-plan.ts'
import { formatLayers } from './layer-range.ts'
import type { LlamaConfig } from './model.ts'
import { type PlanModelShape, planTensorParallel, type TensorParallelOptions, type TensorParallelPlan } from './tensor-parallel-plan.ts'

/** One stage of a layout: its devices (0 = master; the first is the stage's hub) and how many layers it runs. */
export interface StageLayout {
  readonly devices: readonly number[]
  readonly layers: number
}

/** Options of the plan builders: block constraints and matmul mode of every stage's tensor-parallel plan. */
export type StagePlanOptions = Omit<TensorParallelOptions, 'layers' | 'weights'>

/**
 * Layer counts of `nStages` stages as even as possible, earlier stages taking the remainder (5 over 3 → 2, 2, 1).
 * @throws RangeError when there are more stages than layers
 */
export function evenLayerCounts(nLayers: number, nStages: number): number[] {
  if (!Number.isInteger(nStages) || nStages < 1 || nStages > nLayers) {
    throw new RangeError(`cannot spread ${nLayers} layers over ${nStages} pipeline stages: need 1..${nLayers} stages`)
  }
  return Array.from({ length: nStages }, (_, i) => Math.floor(nLayers / nStages) + (i < nLayers % nStages ? 1 : 0))
}

/**
 * The plan of `layouts` (in layer order) for a model: each stage gets an even tensor-parallel plan of its layers over
 * its devices. Kind: one stage = tensor-parallel, one device per stage = pipeline, else hybrid.
 * @param nDevices devices available (master included); those in no stage are listed as excluded.
 * @throws RangeError naming the numbers when the layouts do not cover the layers exactly once, a device is repeated,
 *   out of range or the master is not its stage's first device, or a stage's tensor-parallel plan is impossible.
 */
export function buildClusterPlan(config: LlamaConfig, layouts: readonly StageLayout[], nDevices: number, options: StagePlanOptions = {}): ClusterPlan {
  if (layouts.length === 0) throw new RangeError('cannot build a cluster plan without stages')
  const total = layouts.reduce((n, s) => n + s.layers, 0)
  if (layouts.some((s) => !Number.isInteger(s.layers) || s.layers < 1) || total !== config.nLayers) {
    throw new RangeError(`stage layer counts ${layouts.map((s) => s.layers).join('/')} must be whole numbers ≥ 1 adding up to the model's ${config.nLayers} layers`)
  }
  checkDevices(layouts.map((s) => s.devices), nDevices)
  let start = 0
  const stages: StagePlan[] = layouts.map((s) => {
    const layers = { start, count: s.layers }
    start += s.layers
    return { layers, devices: [...s.devices], tensorParallel: planTensorParallel(config, s.devices.length, { ...options, layers }) }
  })
  const used = new Set(layouts.flatMap((s) => s.devices))
  return {
    kind: planKind(stages),
    version: 1,
    stages,
    predictedMsPerToken: 0,
    // The master always keeps the embedding and the classifier: it is never left out.
    excluded: Array.from({ length: nDevices }, (_, d) => d)
      .filter((d) => d > 0 && !used.has(d))
      .map((device) => ({ device, reason: 'not in the plan' })),
  }
}

/** Kind of a plan from its stages: one stage = tensor-parallel, one device per stage = pipeline, else hybrid. */
export function planKind(stages: readonly { readonly devices: readonly unknown[] }[]): ClusterPlan['kind'] {
  if (stages.length === 1) return 'tensor-parallel'
  return stages.every((s) => s.devices.length === 1) ? 'pipeline' : 'hybrid'
}

/** Tensor parallelism over every device: one stage, all layers. */
export function tensorParallelClusterPlan(config: LlamaConfig, nDevices: number, options: StagePlanOptions = {}): ClusterPlan {
  return buildClusterPlan(config, [{ devices: Array.from({ length: nDevices }, (_, i) => i), layers: config.nLayers }], nDevices, options)
}

/**
 * A pipeline: device i runs the i-th contiguous layer range (even counts, see {@link evenLayerCounts}).
 * @throws RangeError when there are more devices than layers
 */
export function pipelineClusterPlan(config: LlamaConfig, nDevices: number, options: StagePlanOptions = {}): ClusterPlan {
  const counts = evenLayerCounts(config.nLayers, nDevices)
  return buildClusterPlan(config, counts.map((layers, device) => ({ devices: [device], layers })), nDevices, options)
}

/**
 * A hybrid plan: consecutive pairs of devices ({0,1}, {2,3}, …; an odd last device alone) each run a contiguous layer
 * range with tensor parallelism, the pairs chained as a pipeline.
 * @throws RangeError for fewer than 3 devices (2 would be plain tensor parallelism) or more pairs than layers
 */
export function hybridClusterPlan(config: LlamaConfig, nDevices: number, options: StagePlanOptions = {}): ClusterPlan {
  if (nDevices < 3) throw new RangeError(`cannot build a hybrid plan over ${nDevices} devices: need at least 3`)
  const groups = Array.from({ length: Math.ceil(nDevices / 2) }, (_, g) => [2 * g, 2 * g + 1].filter((d) => d < nDevices))
  const counts = evenLayerCounts(config.nLayers, groups.length)
  return buildClusterPlan(config, groups.map((devices, g) => ({ devices, layers: counts[g]! })), nDevices, options)
}

/**
 * Parses a stage layout such as `0+1:2,2+3:3` (stages in layer order separated by commas; each is its devices joined
 * by `+`, a colon, and its layer count).
 * @throws RangeError naming the text
 */
export function parseStageLayout(text: string): StageLayout[] {
  return text.split(',').map((part) => {
    const m = /^\s*(\d+(?:\s*\+\s*\d+)*)\s*:\s*(\d+)\s*$/.exec(part)
    if (!m) throw new RangeError(`invalid plan '${text}': expected tp, pipeline, hybrid, auto or stages DEVICE[+DEVICE...]:LAYERS such as 0+1:2,2+3:3 (stage '${part}')`)
    return { devices: m[1]!.split('+').map((d) => Number(d.trim())), layers: Number(m[2]) }
  })
}

function checkDevices(stageDevices: readonly (readonly number[])[], nDevices: number): void {
  const seen = new Set<number>()
  for (const [i, devices] of stageDevices.entries()) {
    if (devices.length === 0) throw new RangeError(`stage ${i} has no devices`)
    for (const d of devices) {
      if (!Number.isInteger(d) || d < 0 || d >= nDevices) throw new RangeError(`stage ${i} names device ${d}: the cluster has devices 0..${nDevices - 1}`)
      if (seen.has(d)) throw new RangeError(`device ${d} is in more than one stage (or twice in stage ${i})`)
      seen.add(d)
    }
    if (devices.includes(0) && devices[0] !== 0) throw new RangeError(`stage ${i} holds the master (device 0): it must be the stage's first device, its hub`)
  }
}

/**
 * Checks a cluster plan from outside (a plan file) against the model and the devices at hand: structure, stages in
 * layer order covering every layer once, devices, and each stage's tensor-parallel plan (the model's shape, its
 * layers, one shard per device, shares covering every KV head and FFN column exactly once).
 * @returns the plan, typed.
 * @throws RangeError naming the stage and the field.
 */
export function checkClusterPlan(value: unknown, config: LlamaConfig, nDevices: number): ClusterPlan {
  const plan = value as ClusterPlan
  if (typeof plan !== 'object' || plan === null || plan.version !== 1 || !['tensor-parallel', 'pipeline', 'hybrid'].includes(plan.kind)) {
    throw new RangeError('not a cluster plan: expected { kind: tensor-parallel|pipeline|hybrid, version: 1, stages: [...] }')
  }
  if (!Array.isArray(plan.stages) || plan.stages.length === 0) throw new RangeError('cluster plan: stages must be a non-empty array')
  const expected = planTensorParallel(config, 1).model
  const shape = JSON.stringify(expected)
  let next = 0
  for (const [i, stage] of plan.stages.entries()) {
    const { start, count } = stage?.layers ?? {}
    if (start !== next || !Number.isInteger(count) || count! < 1) {
      throw new RangeError(`cluster plan stage ${i}: ${layersText(stage?.layers)} must start at layer ${next} and hold at least one`)
    }
    next += count!
    if (!Array.isArray(stage.devices)) throw new RangeError(`cluster plan stage ${i}: devices must be an array`)
    const tp = stage.tensorParallel as TensorParallelPlan | undefined
    if (tp?.kind !== 'tensor-parallel' || tp.version !== 1 || !Array.isArray(tp.shards)) {
      throw new RangeError(`cluster plan stage ${i}: tensorParallel must be a tensor-parallel plan of version 1`)
    }
    if (tp.layers?.start !== start || tp.layers?.count !== count) {
      throw new RangeError(`cluster plan stage ${i}: its tensor-parallel plan runs ${layersText(tp.layers)}, the stage ${layersText(stage.layers)}`)
    }
    if (JSON.stringify(tp.model) !== shape) throw new RangeError(`cluster plan stage ${i}: the tensor-parallel plan is for another model (${modelDifference(tp.model, expected)})`)
    if (tp.shards.length !== stage.devices.length) {
      throw new RangeError(`cluster plan stage ${i}: ${tp.shards.length} shards for ${stage.devices.length} devices`)
    }
    checkShares(tp, config, i)
  }
  if (next !== config.nLayers) throw new RangeError(`cluster plan: stages cover ${formatLayers(0, next)}, the model has ${formatLayers(0, config.nLayers)}`)
  checkDevices(plan.stages.map((s) => s.devices), nDevices)
  if (planKind(plan.stages) !== plan.kind) throw new RangeError(`cluster plan: kind ${plan.kind} does not match its stages (${planKind(plan.stages)})`)
  return plan
}

/** A plan's (untrusted) layer range for messages: `layers 2–4` when it is one, else its JSON (`layers {"start":-1}`). */
function layersText(range: unknown): string {
  const r = range as { start?: unknown; count?: unknown } | undefined
  if (Number.isInteger(r?.start) && Number.isInteger(r?.count) && (r!.count as number) > 0) return formatLayers(r!.start as number, r!.count as number)
  return `layers ${(JSON.stringify(range) ?? String(range)).slice(0, 60)}`
}

/** The fields where a plan's model shape differs from the model's, e.g. `maxSeqLen 128, the model has 512; dim …`. */
function modelDifference(planned: unknown, expected: PlanModelShape): string {
  const p = (typeof planned === 'object' && planned !== null ? planned : {}) as Record<string, unknown>
  const keys = [...new Set([...Object.keys(expected), ...Object.keys(p)])]
  const differ = keys.filter((k) => JSON.stringify(p[k]) !== JSON.stringify((expected as unknown as Record<string, unknown>)[k]))
  const text = (v: unknown): string => (v === undefined ? 'none' : (JSON.stringify(v) ?? String(v)).slice(0, 40))
  return differ
    .slice(0, 4)
    .map((k) => `${k} ${text(p[k])}, the model has ${text((expected as unknown as Record<string, unknown>)[k])}`)
    .join('; ')
}

/** Shards in index order whose KV heads, query heads and FFN columns tile the model's exactly once. */
function checkShares(tp: TensorParallelPlan, config: LlamaConfig, stage: number): void {
  const group = config.nHeads / config.nKvHeads
  let kv = 0
  let ffn = 0
  const int = (v: unknown): boolean => Number.isInteger(v) && (v as number) >= 0
  for (const [i, s] of tp.shards.entries()) {
    const ok =
      s?.index === i &&
      int(s.kvHeads?.start) && int(s.kvHeads?.count) && s.kvHeads.start === kv &&
      s.heads?.start === kv * group && s.heads?.count === s.kvHeads.count * group &&
      int(s.ffnColumns?.start) && int(s.ffnColumns?.count) && s.ffnColumns.start === ffn
    if (!ok) throw new RangeError(`cluster plan stage ${stage}: shard ${i} does not continue the previous shares (KV heads from ${kv}, FFN columns from ${ffn})`)
    kv += s.kvHeads.count
    ffn += s.ffnColumns.count
  }
  if (kv !== config.nKvHeads || ffn !== config.hiddenDim) {
    throw new RangeError(`cluster plan stage ${stage}: shards cover ${kv} of ${config.nKvHeads} KV heads and ${ffn} of ${config.hiddenDim} FFN columns`)
  }
}
