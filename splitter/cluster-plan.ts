/**
 * Cluster plans: which devices run which layers, and how each stage splits its layers over its devices. Three kinds:
 * tensor parallel (one stage, TPI-LLM §3.1: every device computes a share of every layer, two allreduces per layer),
 * pipeline (prima.cpp-style contiguous layer ranges, one device per stage, hidden states handed from stage to stage)
 * and hybrid (tensor-parallel groups inside low-latency islands of the network, pipelined across slow links).
 *
 * The planner enumerates candidates of every kind over the devices' measured speeds, memory budgets and links, costs
 * them with the model in cluster-cost.ts, and picks the fastest predicted decode time per token. Pure: no I/O.
 */
import {
  attentionShareBytes,
  type ClusterCostInput,
  type ClusterCostOptions,
  ffnShareBytes,
  kvCacheBytes,
  type PlanCost,
  planMemoryBytes,
  predictClusterPlan,
  readMs,
  stageCost,
  stageMemoryBytes,
} from './cluster-cost.ts'
import { InsufficientMemoryError } from './errors.ts'
import { formatLayers } from './layer-range.ts'
import { planTensorParallel, proportionalShares, type TensorParallelPlan, type UnitRange } from './tensor-parallel-plan.ts'

/** One stage of a cluster plan: a layer range run tensor-parallel by a group of devices. */
export interface StagePlan {
  /** Decoder layers this stage runs: [layers.start, layers.start + layers.count). */
  readonly layers: UnitRange
  /** Device indices (0 = master) of the stage's members, in shard order; devices[0] is the stage's allreduce hub. */
  readonly devices: readonly number[]
  /** Tensor-parallel split of the stage's layers over its members: tensorParallel.shards[i] runs on devices[i]. */
  readonly tensorParallel: TensorParallelPlan
}

/**
 * A serialisable plan for a whole cluster. Execution: the master embeds the token, sends x to the first stage's hub,
 * which broadcasts it to its members; they run the stage's layers with two allreduces per layer (hub = devices[0]);
 * the hub returns x to the master, which sends it to the next stage's hub, and so on; the master applies the final norm
 * and classifier. A hub that is the master skips its hand-offs.
 */
export interface ClusterPlan {
  readonly kind: 'tensor-parallel' | 'pipeline' | 'hybrid'
  readonly version: 1
  /** In layer order, covering every layer exactly once. */
  readonly stages: readonly StagePlan[]
  readonly predictedMsPerToken: number
  /** Devices given no work, with the reason (too slow to help, no memory). */
  readonly excluded: readonly { device: number; reason: string }[]
}

/** Options of {@link planClusterChoice}: the cost model's knobs plus planning choices. */
export interface ClusterPlanOptions extends ClusterCostOptions {
  /** Activations of quantized matmuls, carried into every stage's plan. Default 'exact'. */
  readonly quantizedMatmul?: 'exact' | 'int8'
  /** Round-trip thresholds (ms) at which hybrid islands are formed. Default: every distinct link rtt. */
  readonly islandThresholdsMs?: readonly number[]
}

/** The planner's input: model cost shape, devices (index 0 = master), link lookup and options. */
export interface ClusterPlanInput extends ClusterCostInput {
  readonly options?: ClusterPlanOptions
}

/** A feasible candidate: a plan with a short label, its predicted cost and the memory it needs per device. */
export interface PlanAlternative {
  /** Kind and how it was built, e.g. `tensor-parallel over laptop, pi-a`, `hybrid, islands at rtt ≤ 1 ms, fastest first`. */
  readonly label: string
  readonly plan: ClusterPlan
  readonly cost: PlanCost
  /** Bytes each device needs under this plan, by device index (master: embedding and classifier included). */
  readonly memoryBytes: readonly number[]
}

/** The planner's answer. */
export interface ClusterPlanChoice {
  /** The fastest predicted plan (`alternatives[0].plan`). */
  readonly chosen: ClusterPlan
  /** Every feasible candidate, fastest first (the chosen one included), deduplicated. */
  readonly alternatives: readonly PlanAlternative[]
  /** Why: the chosen plan's cost, the best of every other kind, the even split, notes. One line each. */
  readonly reasons: readonly string[]
}

type Group = readonly number[]
type BuiltStage = StagePlan | { readonly failure: string }

function isStage(s: BuiltStage): s is StagePlan {
  return !('failure' in s)
}

const EPSILON = 1e-9

/**
 * Splits 1 over members in proportion to `speeds`, no member above its `caps` fraction (water filling).
 * @returns fractions summing to 1, or null when the caps sum to less than 1
 */
export function waterFill(speeds: readonly number[], caps: readonly number[]): number[] | null {
  const n = speeds.length
  const f = new Array<number>(n).fill(0)
  const fixed = new Set<number>()
  let remaining = 1
  for (let round = 0; round <= n; round++) {
    const free = [...Array(n).keys()].filter((i) => !fixed.has(i))
    if (free.length === 0) return remaining <= EPSILON ? f : null
    const total = free.reduce((s, i) => s + speeds[i]!, 0)
    for (const i of free) f[i] = (remaining * speeds[i]!) / total
    const over = free.filter((i) => f[i]! > caps[i]! + EPSILON)
    if (over.length === 0) return f
    for (const i of over) {
      f[i] = caps[i]!
      fixed.add(i)
      remaining -= caps[i]!
    }
    if (remaining <= EPSILON) return null
  }
  return null
}

class Planner {
  readonly input: ClusterPlanInput
  readonly nLayers: number
  readonly ctx: number
  readonly #stageCache = new Map<string, BuiltStage>()

  constructor(input: ClusterPlanInput) {
    this.input = input
    this.nLayers = input.model.config.nLayers
    this.ctx = input.options?.contextPositions ?? input.model.config.maxSeqLen
  }

  name(d: number): string {
    return this.input.devices[d]!.name
  }

  /** Bytes device `d` has for shards (the master's embedding and classifier taken off). */
  avail(d: number): number {
    return this.input.devices[d]!.budgetBytes - (d === 0 ? this.input.model.masterBytes : 0)
  }

  /** Bytes of all heads and FFN columns of `layers`, split by how they are read. */
  fullBytes(layers: UnitRange): { denseBytes: number; nbitsBytes: number } {
    const { model } = this.input
    const c = model.config
    const all = { heads: { start: 0, count: c.nHeads }, kvHeads: { start: 0, count: c.nKvHeads }, ffnColumns: { start: 0, count: c.hiddenDim } }
    let denseBytes = 0
    let nbitsBytes = 0
    for (let l = layers.start; l < layers.start + layers.count; l++) {
      const a = attentionShareBytes(model, model.layers[l]!, all)
      const f = ffnShareBytes(model, model.layers[l]!, all)
      denseBytes += a.denseBytes + f.denseBytes
      nbitsBytes += a.nbitsBytes + f.nbitsBytes
    }
    return { denseBytes, nbitsBytes }
  }

  /** Device `d`'s effective decode rate over the weight mix of the model's layers, bytes per ms. */
  rate(d: number): number {
    const all = this.fullBytes({ start: 0, count: this.nLayers })
    return (all.denseBytes + all.nbitsBytes) / readMs(this.input.devices[d]!, all)
  }

  /**
   * A tensor-parallel stage of `members` (hub first) over `layers`: shares follow speed ('speed', water-filled under
   * memory caps) or are equal ('even'). Members left without work are dropped.
   */
  stage(members: Group, layers: UnitRange, mode: 'speed' | 'even' = 'speed'): BuiltStage {
    const key = `${mode}|${members.join(',')}|${layers.start}+${layers.count}`
    let built = this.#stageCache.get(key)
    if (!built) {
      built = this.#buildStage(members, layers, mode)
      this.#stageCache.set(key, built)
    }
    return built
  }

  #buildStage(members: Group, layers: UnitRange, mode: 'speed' | 'even'): BuiltStage {
    const { model } = this.input
    if (members.length === 0) return { failure: 'no devices' }
    const avail = members.map((d) => this.avail(d))
    const poor = members.find((_, i) => avail[i]! <= 0)
    if (poor !== undefined) return { failure: `${this.name(poor)} has no memory left for a share` }
    const full = this.fullBytes(layers)
    const stageBytes = full.denseBytes + full.nbitsBytes + kvCacheBytes(model, model.config.nKvHeads, layers.count, this.ctx)
    let caps = avail.map((a) => a / stageBytes)
    const speeds = members.map((d) => (mode === 'even' ? 1 : this.rate(d)))
    for (let attempt = 0; attempt < 16; attempt++) {
      const fractions = mode === 'even' ? members.map(() => 1 / members.length) : waterFill(speeds, caps)
      if (!fractions) {
        const hold = avail.reduce((a, b) => a + b, 0)
        return { failure: `${members.map((d) => this.name(d)).join(', ')} hold ${hold} bytes, ${formatLayers(layers.start, layers.count)} need ${stageBytes}` }
      }
      let tp: TensorParallelPlan
      try {
        tp = planTensorParallel(model.config, members.length, {
          weights: fractions,
          ffnBlock: model.ffnBlock,
          attentionBlock: model.attentionBlock,
          layers,
          quantizedMatmul: this.input.options?.quantizedMatmul ?? 'exact',
        })
      } catch (err) {
        return { failure: (err as Error).message }
      }
      const idle = tp.shards.filter((s) => s.kvHeads.count === 0 && s.ffnColumns.count === 0).map((s) => members[s.index]!)
      if (idle.length > 0) return this.stage(members.filter((d) => !idle.includes(d)), layers, mode)
      const stage: StagePlan = { layers, devices: members, tensorParallel: tp }
      const need = stageMemoryBytes(this.input, stage)
      const over = need.map((b, i) => b - avail[i]!)
      if (over.every((o) => o <= 0)) return stage
      if (mode === 'even') {
        const i = over.findIndex((o) => o > 0)
        return { failure: `${this.name(members[i]!)} needs ${need[i]} bytes for an even share, its budget leaves ${avail[i]}` }
      }
      caps = caps.map((c, i) => (over[i]! > 0 ? c * (avail[i]! / need[i]!) * 0.98 : c))
    }
    return { failure: `no split of whole KV heads and FFN blocks fits ${members.map((d) => this.name(d)).join(', ')}` }
  }

  /** `group` ordered for a stage: the master first if it is a member, else the hub whose stage is fastest; then by index. */
  hubOrder(group: Group): Group {
    const sorted = [...group].sort((a, b) => a - b)
    if (sorted.includes(0) || sorted.length === 1) return sorted
    let best: { order: Group; ms: number } | null = null
    for (const hub of sorted) {
      const order = [hub, ...sorted.filter((d) => d !== hub)]
      const s = this.stage(order, { start: 0, count: 1 })
      if (!isStage(s)) continue
      const c = stageCost(this.input, s)
      const ms = c.computeMs + c.allreduceMs + c.handoffMs
      if (!best || ms < best.ms) best = { order, ms }
    }
    return best?.order ?? sorted
  }

  /** Most layers `group` (hub first) can hold, 0..nLayers. */
  maxLayers(group: Group): number {
    let lo = 0
    let hi = this.nLayers
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2)
      if (isStage(this.stage(group, { start: 0, count: mid }))) lo = mid
      else hi = mid - 1
    }
    return lo
  }

  /** Predicted ms per layer of `group` holding `count` layers (compute and allreduces; hand-offs excluded). */
  perLayerMs(group: Group, count: number): number {
    const s = this.stage(group, { start: 0, count: Math.max(1, count) })
    if (!isStage(s)) return Number.POSITIVE_INFINITY
    const c = stageCost(this.input, s)
    return (c.computeMs + c.allreduceMs) / s.layers.count
  }

  /**
   * Contiguous layer ranges over `groups`: 'fastest' fills the fastest groups first (decode runs stages one after
   * another, so extra stages only add hand-offs); 'balanced' gives layers in proportion to speed (prima.cpp's layer
   * assignment), both capped by memory. Groups given no layers are left out. Null when the layers do not fit.
   */
  pipeline(groups: readonly Group[], variant: 'fastest' | 'balanced'): StagePlan[] | null {
    const N = this.nLayers
    const caps = groups.map((g) => this.maxLayers(g))
    const ms = groups.map((g, i) => this.perLayerMs(g, Math.min(N, caps[i]!)))
    const counts = new Array<number>(groups.length).fill(0)
    const usable = groups.map((_, i) => i).filter((i) => caps[i]! > 0 && Number.isFinite(ms[i]!))
    if (usable.reduce((s, i) => s + caps[i]!, 0) < N) return null
    if (variant === 'fastest') {
      let left = N
      for (const i of [...usable].sort((a, b) => ms[a]! - ms[b]! || a - b)) {
        counts[i] = Math.min(left, caps[i]!)
        left -= counts[i]!
      }
    } else {
      let left = N
      let open = [...usable]
      while (left > 0 && open.length > 0) {
        const shares = proportionalShares(left, open.map((i) => 1 / ms[i]!))
        left = 0
        open.forEach((i, k) => {
          const room = caps[i]! - counts[i]!
          const give = Math.min(room, shares[k]!)
          counts[i]! += give
          left += shares[k]! - give
        })
        open = open.filter((i) => counts[i]! < caps[i]!)
      }
      if (left > 0) return null
    }
    const order = groups.map((_, i) => i).filter((i) => counts[i]! > 0)
    order.sort((a, b) => Math.min(...groups[a]!) - Math.min(...groups[b]!))
    const stages: StagePlan[] = []
    let start = 0
    for (const i of order) {
      const s = this.stage(groups[i]!, { start, count: counts[i]! })
      if (!isStage(s)) return null
      stages.push(s)
      start += counts[i]!
    }
    return stages
  }

  /** Connected components of the devices `among` over links with rtt ≤ `thresholdMs`. */
  islands(among: readonly number[], thresholdMs: number): number[][] {
    const parent = new Map(among.map((d) => [d, d]))
    const find = (d: number): number => {
      while (parent.get(d) !== d) d = parent.get(d)!
      return d
    }
    for (const [i, a] of among.entries()) {
      for (const b of among.slice(i + 1)) {
        if (this.input.link(a, b).rttMs <= thresholdMs) parent.set(find(a), find(b))
      }
    }
    const groups = new Map<number, number[]>()
    for (const d of among) {
      const root = find(d)
      groups.set(root, [...(groups.get(root) ?? []), d])
    }
    return [...groups.values()].sort((x, y) => Math.min(...x) - Math.min(...y))
  }
}

function kindOf(stages: readonly StagePlan[]): ClusterPlan['kind'] {
  if (stages.length === 1) return 'tensor-parallel'
  return stages.every((s) => s.devices.length === 1) ? 'pipeline' : 'hybrid'
}

function fmtMs(ms: number): string {
  return ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2)
}

function human(bytes: number): string {
  const abs = Math.abs(bytes)
  return abs >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : abs >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : `${(bytes / 2 ** 10).toFixed(1)} KiB`
}

/** Bytes for messages: the exact count and KiB/MiB/GiB, e.g. `2130984960 bytes (1.98 GiB)`. */
export function formatBytes(bytes: number): string {
  return `${Math.round(bytes)} bytes (${human(bytes)})`
}

/**
 * Plans a cluster: enumerates tensor-parallel plans over every prefix of the devices sorted by speed (dropping the
 * slowest), an even split over all (TPI-LLM's), pipelines over all devices (fastest first, and layers in proportion to
 * speed), and hybrids over islands of the network at every distinct link rtt (or `options.islandThresholdsMs`), with
 * tensor-parallel shares in proportion to each device's decode rate under its memory budget; costs them
 * (cluster-cost.ts) and picks the fastest predicted ms/token. Ties go to fewer devices.
 *
 * @returns the chosen plan, every feasible alternative fastest first, and the reasons (one line each)
 * @throws InsufficientMemoryError naming the devices, their budgets and the bytes lacking when no plan fits (the master
 *   alone when its budget cannot hold the embedding and classifier); RangeError for malformed input (no devices, a
 *   speed or budget that is not a finite number > 0)
 */
export function planClusterChoice(input: ClusterPlanInput): ClusterPlanChoice {
  checkInput(input)
  const p = new Planner(input)
  const N = p.nLayers
  const devices = input.devices
  const all: UnitRange = { start: 0, count: N }
  const masterShort = input.model.masterBytes - devices[0]!.budgetBytes
  if (masterShort > 0) {
    throw new InsufficientMemoryError(
      [{ name: devices[0]!.name, budgetBytes: devices[0]!.budgetBytes }],
      input.model.masterBytes,
      masterShort,
      `cannot fit the embedding and classifier on the master ${devices[0]!.name}: they need ${formatBytes(input.model.masterBytes)}, ` +
        `its budget is ${formatBytes(devices[0]!.budgetBytes)}: ${formatBytes(masterShort)} lacking`,
    )
  }
  const usable = devices.map((_, i) => i).filter((d) => p.avail(d) > 0)
  const bySpeed = [...usable].sort((a, b) => p.rate(b) - p.rate(a) || a - b)

  const candidates = new Map<string, { label: string; stages: StagePlan[] }>()
  const names = (g: Group): string => g.map((d) => p.name(d)).join(', ')
  /** Adds a candidate once; its label is its kind and `how` it was built (one stage: the devices it runs on). */
  const push = (how: string, stages: readonly StagePlan[] | null): void => {
    if (!stages || stages.length === 0) return
    const key = stages.map((s) => `${s.devices.join(',')}:${s.layers.start}+${s.layers.count}:${s.tensorParallel.shards.map((x) => x.ffnColumns.count).join('/')}`).join('|')
    if (candidates.has(key)) return
    const label = stages.length === 1 ? `tensor-parallel${how === 'even split' ? ', even split,' : ''} over ${names(stages[0]!.devices)}` : `${kindOf(stages)}, ${how}`
    candidates.set(key, { label, stages: [...stages] })
  }

  // Tensor parallel over the k fastest devices, k = 1..n.
  for (let k = 1; k <= bySpeed.length; k++) {
    const group = p.hubOrder(bySpeed.slice(0, k))
    const s = p.stage(group, all)
    if (isStage(s)) push('speed', [s])
  }
  // TPI-LLM's even split over every device.
  if (usable.length > 1) {
    const s = p.stage(p.hubOrder(usable), all, 'even')
    if (isStage(s)) push('even split', [s])
  }
  // Pipelines, one device per stage.
  const singletons = usable.map((d) => [d])
  push('one device per stage, fastest devices first', p.pipeline(singletons, 'fastest'))
  push('one device per stage, layers in proportion to speed', p.pipeline(singletons, 'balanced'))
  // Hybrids: tensor-parallel islands of low-latency links, pipelined across the slower links between them.
  const rtts = new Set<number>()
  for (const [i, a] of usable.entries()) for (const b of usable.slice(i + 1)) rtts.add(input.link(a, b).rttMs)
  const thresholds = [...(input.options?.islandThresholdsMs ?? [...rtts])].sort((a, b) => a - b)
  let islandSplits = 0
  for (const threshold of thresholds) {
    const islands = p.islands(usable, threshold)
    if (islands.length < 2 || islands.every((g) => g.length === 1)) continue
    islandSplits++
    const full = islands.map((g) => p.hubOrder(g))
    // Each island trimmed to its fastest members when dropping the slow ones makes a layer faster.
    const trimmed = islands.map((island) => {
      const sorted = [...island].sort((a, b) => p.rate(b) - p.rate(a) || a - b)
      let best: { group: Group; ms: number } | null = null
      for (let k = 1; k <= sorted.length; k++) {
        const group = p.hubOrder(sorted.slice(0, k))
        const ms = p.perLayerMs(group, 1)
        if (!best || ms < best.ms - EPSILON) best = { group, ms }
      }
      return best!.group
    })
    for (const island of full) {
      if (island.length < 2) continue
      const s = p.stage(island, all)
      if (isStage(s)) push('island', [s])
    }
    const at = `islands at rtt ≤ ${fmtMs(threshold)} ms`
    push(`${at}, fastest first`, p.pipeline(full, 'fastest'))
    push(`${at}, layers in proportion to speed`, p.pipeline(full, 'balanced'))
    push(`${at}, slow members dropped, fastest first`, p.pipeline(trimmed, 'fastest'))
    push(`${at}, slow members dropped, layers in proportion to speed`, p.pipeline(trimmed, 'balanced'))
  }

  if (candidates.size === 0) throw noPlanError(p)

  const costed = [...candidates.values()].map(({ label, stages }) => {
    const cost = predictClusterPlan(input, { stages })
    const used = new Set(stages.flatMap((s) => s.devices))
    return { label, stages, cost, used, memoryBytes: planMemoryBytes(input, { stages }) }
  })
  costed.sort((a, b) => a.cost.totalMs - b.cost.totalMs || a.used.size - b.used.size || a.label.localeCompare(b.label))

  const alternatives: PlanAlternative[] = costed.map((c, rank) => {
    const excluded: { device: number; reason: string }[] = []
    for (let d = 1; d < devices.length; d++) {
      if (c.used.has(d)) continue
      const best = costed.find((o) => o.used.has(d))
      let reason: string
      if (p.avail(d) <= 0 || !best) {
        reason = `no memory: no plan that fits gives it a share (budget ${formatBytes(devices[d]!.budgetBytes)})`
      } else if (rank === 0) {
        reason = `too slow to help: the fastest plan using it (${best.label}) predicts ${fmtMs(best.cost.totalMs)} ms/token, ${fmtMs(c.cost.totalMs)} without it`
      } else {
        reason = `not used by this plan (the fastest plan using it: ${best.label}, ${fmtMs(best.cost.totalMs)} ms/token)`
      }
      excluded.push({ device: d, reason })
    }
    const plan: ClusterPlan = { kind: kindOf(c.stages), version: 1, stages: c.stages, predictedMsPerToken: c.cost.totalMs, excluded }
    return { label: c.label, plan, cost: c.cost, memoryBytes: c.memoryBytes }
  })

  const chosen = alternatives[0]!
  const reasons: string[] = []
  const parts = (c: PlanCost): string =>
    `compute ${fmtMs(c.computeMs)}, allreduce ${fmtMs(c.allreduceMs)}, hand-offs ${fmtMs(c.handoffMs)}, head ${fmtMs(c.headMs)}`
  reasons.push(`chose ${chosen.label}: ${fmtMs(chosen.cost.totalMs)} ms/token predicted (${parts(chosen.cost)})`)
  for (const kind of ['tensor-parallel', 'pipeline', 'hybrid'] as const) {
    if (kind === chosen.plan.kind) continue
    const best = alternatives.find((a) => a.plan.kind === kind)
    if (best) {
      reasons.push(`best ${kind}: ${best.label}: ${fmtMs(best.cost.totalMs)} ms/token (${parts(best.cost)})`)
    } else if (kind === 'tensor-parallel') {
      reasons.push('tensor-parallel: no group of devices holds the whole model')
    } else if (kind === 'hybrid') {
      reasons.push(
        islandSplits === 0
          ? 'hybrid: the links form no separate low-latency islands (a hybrid needs a group of close devices and a slower link)'
          : 'hybrid: no split into low-latency islands fits in memory',
      )
    } else {
      reasons.push('pipeline: no assignment of layers to single devices fits')
    }
  }
  const even = alternatives.find((a) => a.label.startsWith('tensor-parallel, even split,'))
  if (even && even !== chosen) {
    reasons.push(
      `even split over all ${even.plan.stages[0]!.devices.length} devices (TPI-LLM): ${fmtMs(even.cost.totalMs)} ms/token; ` +
        `the chosen plan predicts ${(chosen.cost.totalMs / even.cost.totalMs).toPrecision(2)}× that`,
    )
  }
  if (!chosen.plan.stages.some((s) => s.devices.includes(0))) {
    reasons.push(`the master ${devices[0]!.name} holds no layers: it embeds tokens, routes hidden states and applies the classifier`)
  }
  return { chosen: chosen.plan, alternatives, reasons }
}

/**
 * TPI-LLM's even split: one tensor-parallel stage over every device (master first as hub), equal shares of KV heads
 * and FFN blocks, costed with the same model (for comparisons with {@link planClusterChoice}).
 * @throws InsufficientMemoryError when some device cannot hold its even share (named, with the bytes lacking)
 */
export function planEvenTensorParallel(input: ClusterPlanInput): ClusterPlan {
  checkInput(input)
  const p = new Planner(input)
  const members = input.devices.map((_, i) => i)
  const s = p.stage(members, { start: 0, count: p.nLayers }, 'even')
  if (!isStage(s)) {
    const tp = planTensorParallel(input.model.config, members.length, {
      ffnBlock: input.model.ffnBlock,
      attentionBlock: input.model.attentionBlock,
      quantizedMatmul: input.options?.quantizedMatmul ?? 'exact',
    })
    const need = planMemoryBytes(input, { stages: [{ layers: tp.layers, devices: members, tensorParallel: tp }] })
    const short = members.map((d) => need[d]! - input.devices[d]!.budgetBytes)
    const worst = short.reduce((w, x, i) => (x > short[w]! ? i : w), 0)
    const device = input.devices[worst]!
    throw new InsufficientMemoryError(
      [{ name: device.name, budgetBytes: device.budgetBytes }],
      need[worst]!,
      Math.max(0, short[worst]!),
      `cannot split the model evenly over ${members.length} devices: ${device.name} needs ${formatBytes(need[worst]!)}, ` +
        `its budget is ${formatBytes(device.budgetBytes)}: ${formatBytes(Math.max(0, short[worst]!))} lacking`,
    )
  }
  const cost = predictClusterPlan(input, { stages: [s] })
  return { kind: 'tensor-parallel', version: 1, stages: [s], predictedMsPerToken: cost.totalMs, excluded: [] }
}

function checkInput(input: ClusterPlanInput): void {
  if (input.devices.length === 0) throw new RangeError('cannot plan a cluster of 0 devices')
  for (const d of input.devices) {
    for (const [key, value] of [
      ['decodeGBs', d.decodeGBs],
      ['budgetBytes', d.budgetBytes],
      ['decodeNBitsGBs', d.decodeNBitsGBs ?? 1],
    ] as const) {
      if (!Number.isFinite(value) || value <= 0) throw new RangeError(`cannot plan with device ${d.name}: ${key} is ${value}, need a finite number > 0`)
    }
    for (const [key, value] of [
      ['blockOverheadMs', d.blockOverheadMs ?? 0],
      ['messageOverheadMs', d.messageOverheadMs ?? 0],
    ] as const) {
      if (!Number.isFinite(value) || value < 0) throw new RangeError(`cannot plan with device ${d.name}: ${key} is ${value}, need a finite number ≥ 0`)
    }
  }
  if (input.model.layers.length !== input.model.config.nLayers) {
    throw new RangeError(`cannot plan: the cost shape has ${input.model.layers.length} layers, the config ${input.model.config.nLayers}`)
  }
}

function noPlanError(p: Planner): InsufficientMemoryError {
  const { model } = p.input
  const devices = p.input.devices
  const full = p.fullBytes({ start: 0, count: p.nLayers })
  const weights = full.denseBytes + full.nbitsBytes
  const kv = kvCacheBytes(model, model.config.nKvHeads, p.nLayers, p.ctx)
  const needed = weights + kv + model.masterBytes
  const hold = devices.reduce((s, d) => s + d.budgetBytes, 0)
  const lacking = Math.max(0, needed - hold)
  const list = devices.map((d) => ({ name: d.name, budgetBytes: d.budgetBytes }))
  const needs = `${Math.round(needed)} bytes (${human(needed)}: weights ${human(weights)}, KV cache ${human(kv)} at ${p.ctx} positions, embedding and classifier ${human(model.masterBytes)})`
  if (lacking > 0 && devices.length === 1) {
    return new InsufficientMemoryError(
      list,
      needed,
      lacking,
      `cannot fit the model on device ${devices[0]!.name}: it needs ${needs}, its budget is ${formatBytes(devices[0]!.budgetBytes)}: ${formatBytes(lacking)} lacking`,
    )
  }
  const budgets = `${Math.round(hold)} bytes (${human(hold)}: ${devices.map((d) => `${d.name} ${human(d.budgetBytes)}`).join(', ')})`
  if (lacking > 0) {
    return new InsufficientMemoryError(
      list,
      needed,
      lacking,
      `cannot fit the model on devices ${devices.map((d) => d.name).join(', ')}: it needs ${needs}, their budgets hold ${budgets}: ${formatBytes(lacking)} lacking`,
    )
  }
  return new InsufficientMemoryError(
    list,
    needed,
    0,
    `cannot split the model over devices ${devices.map((d) => d.name).join(', ')}: their budgets hold ${budgets}, enough for the ${needs} ` +
      'it needs in total, but no split into whole layers, KV heads and FFN blocks fits them',
  )
}
