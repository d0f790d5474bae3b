/**
 * The cost model of cluster plans: predicted decode time per token and memory per device, from device speeds, link
 * round trips and bandwidths, and the bytes each device's share of the weights occupies. Pure.
 *
 * Decode is memory bound, so a block's compute is the bytes of its share / the device's decode rate, plus a fixed
 * per-block overhead of that device (session run, norms, RoPE, attention over the cache: CPU work, so a slower device
 * pays more). Per layer every tensor-parallel stage runs two star allreduces (TPI-LLM §3.1: after attention and after
 * the FFN; hub = the stage's first device): members send their partial sums to the hub and get the sum back,
 * 2 × (rtt/2 + bytes/bandwidth + the member's per-message cost) over the slowest member, plus the hub's additions and
 * its per-message cost for each of the n − 1 partial sums it takes in and the n − 1 sums it sends (the last partial
 * and the sends are on the critical path: n messages). Hidden states move between stages through the master
 * (prima.cpp-style pipeline, but routed as edgeshard executes it): the master sends x to the stage hub, the hub
 * broadcasts it to its members, and returns the stage's output to the master. The master finally applies the
 * classifier.
 *
 * A link's rtt is the application-level round trip of a small message (as `agent/link-probe.ts` measures it over the
 * real stream), so the per-message cost is only the CPU time a device spends on each message beyond that: framing,
 * encryption, copies, waking its event loop (default 0).
 */
import type { ClusterPlan, StagePlan } from './cluster-plan.ts'
import { attentionKernel } from './graph/llama-blocks.ts'
import { formatLayers, layerGroupSizes, MAX_GRAPH_WEIGHT_BYTES } from './layer-range.ts'
import type { LayerStorage, ModelCostShape, WeightStorage } from './model-cost.ts'
import type { ShardSpec, UnitRange } from './tensor-parallel-plan.ts'

/** A device as the planner sees it (a structural shape: devices/ is not imported). */
export interface PlannerDevice {
  /** Name used in messages. */
  readonly name: string
  /** Decode matvec rate with dense f32 weights, GB/s (1e9 bytes/s). */
  readonly decodeGBs: number
  /** The same for MatMulNBits weights, GB/s; default `decodeGBs`. */
  readonly decodeNBitsGBs?: number
  /** Bytes the planner may give this device: weights, KV cache, and on the master the embedding and classifier. */
  readonly budgetBytes: number
  /** Fixed cost of one block (attention or FFN) on this device, ms; default the options' `blockOverheadMs`. */
  readonly blockOverheadMs?: number
  /** CPU time this device spends on each message it sends or receives, ms; default the options' `messageOverheadMs`. */
  readonly messageOverheadMs?: number
}

/** A link between two devices. */
export interface PlannerLink {
  /** Round-trip time of a small message, ms. */
  readonly rttMs: number
  /** Throughput, Mbit/s. */
  readonly mbps: number
}

/** Knobs of the cost model. */
export interface ClusterCostOptions {
  /**
   * Fixed cost of running one block (attention or FFN) on a device that does not give its own, ms. Default
   * {@link DEFAULT_BLOCK_OVERHEAD_MS}.
   */
  readonly blockOverheadMs?: number
  /** Per-message CPU cost of a device that does not give its own, ms (see the module comment). Default 0. */
  readonly messageOverheadMs?: number
  /** Bytes per value of allreduce partial sums and sums on the wire (hidden states stay f32). Default 4 (f32). */
  readonly wireBytesPerValue?: number
  /** Positions the KV cache is sized for. Default: the model's `maxSeqLen`. */
  readonly contextPositions?: number
  /**
   * Most decoder layers per graph on a one-device stage (the runner's `layersPerGraph`): such a stage runs whole layers
   * per graph and pays the block overhead once per graph, not per block. 0 = one graph per block. Default: the whole
   * stage, at most {@link MAX_GRAPH_WEIGHT_BYTES} of weights per graph.
   */
  readonly layersPerGraph?: number
}

/** Default fixed cost of one block on one device, ms (an onnxruntime run is ≈ 12 µs plus norms, RoPE, small ops). */
export const DEFAULT_BLOCK_OVERHEAD_MS = 0.05

/** What the cost model needs: the model, the devices (index 0 = master) and a link lookup. */
export interface ClusterCostInput {
  readonly model: ModelCostShape
  readonly devices: readonly PlannerDevice[]
  /** The link between devices `a` and `b` (indices; symmetric). Never called with a === b. */
  readonly link: (a: number, b: number) => PlannerLink
  readonly options?: ClusterCostOptions
}

/** Predicted decode time per token, ms, and its parts. */
export interface PlanCost {
  /** Block compute on the critical path (slowest member per block), all stages. */
  readonly computeMs: number
  /** Allreduce time (2 per layer per multi-device stage). */
  readonly allreduceMs: number
  /** Master → hub, hub broadcast to members, hub → master, all stages. */
  readonly handoffMs: number
  /** Final norm and classifier on the master. */
  readonly headMs: number
  readonly totalMs: number
}

/** Bytes a share of one layer occupies, split by how it is read. */
export interface ShareBytes {
  readonly denseBytes: number
  readonly nbitsBytes: number
}

function add(acc: { dense: number; nbits: number }, s: WeightStorage, elements: number): void {
  if (s.quantized) acc.nbits += elements * s.bytesPerElement
  else acc.dense += elements * s.bytesPerElement
}

/** Bytes of a shard's attention share in one layer (Wq, Wk, Wv rows of its heads, Wo columns). */
export function attentionShareBytes(model: ModelCostShape, layer: LayerStorage, shard: Pick<ShardSpec, 'heads' | 'kvHeads'>): ShareBytes {
  const { dim, headDim } = model.config
  const acc = { dense: 0, nbits: 0 }
  add(acc, layer.wq, shard.heads.count * headDim * dim)
  add(acc, layer.wo, shard.heads.count * headDim * dim)
  add(acc, layer.wk, shard.kvHeads.count * headDim * dim)
  add(acc, layer.wv, shard.kvHeads.count * headDim * dim)
  return { denseBytes: acc.dense, nbitsBytes: acc.nbits }
}

/** Bytes of a shard's FFN share in one layer (W1, W3 rows and W2 columns of its SwiGLU columns). */
export function ffnShareBytes(model: ModelCostShape, layer: LayerStorage, shard: Pick<ShardSpec, 'ffnColumns'>): ShareBytes {
  const { dim } = model.config
  const acc = { dense: 0, nbits: 0 }
  add(acc, layer.w1, shard.ffnColumns.count * dim)
  add(acc, layer.w3, shard.ffnColumns.count * dim)
  add(acc, layer.w2, shard.ffnColumns.count * dim)
  return { denseBytes: acc.dense, nbitsBytes: acc.nbits }
}

/** Time to read `bytes` on `device`, ms. */
export function readMs(device: PlannerDevice, bytes: ShareBytes): number {
  return bytes.denseBytes / (device.decodeGBs * 1e6) + bytes.nbitsBytes / ((device.decodeNBitsGBs ?? device.decodeGBs) * 1e6)
}

/** Fixed cost of one block on device `d` of `input`, ms: its own, else the options', else the default. */
export function blockOverheadMs(input: Pick<ClusterCostInput, 'devices' | 'options'>, d: number): number {
  return input.devices[d]!.blockOverheadMs ?? input.options?.blockOverheadMs ?? DEFAULT_BLOCK_OVERHEAD_MS
}

/** Per-message CPU cost of device `d` of `input`, ms: its own, else the options', else 0. */
export function messageOverheadMs(input: Pick<ClusterCostInput, 'devices' | 'options'>, d: number): number {
  return input.devices[d]!.messageOverheadMs ?? input.options?.messageOverheadMs ?? 0
}

/** One-way transfer of `bytes` over `link`: rtt/2 + bytes / bandwidth, ms. */
export function transferMs(link: PlannerLink, bytes: number): number {
  return link.rttMs / 2 + (bytes * 8) / (link.mbps * 1e3)
}

/** KV cache bytes of a shard holding `kvHeads` KV heads over `layers` layers (agent/shard-encoding.ts kvCacheBytes). */
export function kvCacheBytes(model: ModelCostShape, kvHeads: number, layers: number, contextPositions: number): number {
  if (kvHeads === 0) return 0
  return 2 * kvHeads * model.config.headDim * contextPositions * 4 * (layers + 1)
}

function layersOf(range: UnitRange): number[] {
  return Array.from({ length: range.count }, (_, i) => range.start + i)
}

/**
 * Memory each member of `stage` needs, bytes, in member order: its weights over the stage's layers (norm vectors
 * included) plus its KV cache at the full context. The master's embedding and classifier are not included.
 */
export function stageMemoryBytes(input: ClusterCostInput, stage: StagePlan): number[] {
  const model = input.model
  const ctx = input.options?.contextPositions ?? model.config.maxSeqLen
  return stage.tensorParallel.shards.map((shard) => {
    let bytes = 0
    for (const l of layersOf(stage.layers)) {
      const layer = model.layers[l]!
      const a = attentionShareBytes(model, layer, shard)
      const f = ffnShareBytes(model, layer, shard)
      bytes += a.denseBytes + a.nbitsBytes + f.denseBytes + f.nbitsBytes
      if (shard.kvHeads.count > 0) bytes += model.config.dim * 4
      if (shard.ffnColumns.count > 0) bytes += model.config.dim * 4
    }
    return bytes + kvCacheBytes(model, shard.kvHeads.count, stage.layers.count, ctx)
  })
}

/** Memory every device needs under `plan`, bytes, by device index (the master's embedding and classifier included). */
export function planMemoryBytes(input: ClusterCostInput, plan: Pick<ClusterPlan, 'stages'>): number[] {
  const need = input.devices.map((_, i) => (i === 0 ? input.model.masterBytes : 0))
  for (const stage of plan.stages) {
    stageMemoryBytes(input, stage).forEach((bytes, i) => {
      need[stage.devices[i]!]! += bytes
    })
  }
  return need
}

/** Predicted cost of one stage per token (without the master's head). */
export function stageCost(input: ClusterCostInput, stage: StagePlan): Omit<PlanCost, 'headMs' | 'totalMs'> {
  const { model, devices } = input
  const msg = (d: number): number => messageOverheadMs(input, d)
  // Hidden states move as f32 (stage hand-offs, the broadcast of x); allreduce tensors at the wire dtype.
  const hiddenBytes = model.config.dim * 4
  const partialBytes = model.config.dim * (input.options?.wireBytesPerValue ?? 4)
  const members = stage.devices
  const hub = members[0]!
  const link = (a: number, b: number): PlannerLink => (a === b ? { rttMs: 0, mbps: Number.POSITIVE_INFINITY } : input.link(a, b))

  let handoffMs = 0
  // x from the master to the hub and the stage's output back: a send and a receive on each side.
  if (hub !== 0) handoffMs += transferMs(link(0, hub), hiddenBytes) + transferMs(link(hub, 0), hiddenBytes) + 2 * msg(0) + 2 * msg(hub)
  let allreduceOnceMs = 0
  if (members.length > 1) {
    // Broadcast of x at stage start: the hub's sends serialise on its uplink and its CPU; the last one arrives half
    // an rtt later and is taken in by its member.
    let sendMs = 0
    let halfRttMs = 0
    let slowestMs = 0
    let slowestReceiveMs = 0
    for (const m of members.slice(1)) {
      const l = link(hub, m)
      sendMs += (hiddenBytes * 8) / (l.mbps * 1e3) + msg(hub)
      halfRttMs = Math.max(halfRttMs, l.rttMs / 2)
      slowestMs = Math.max(slowestMs, transferMs(l, partialBytes) + msg(m))
      slowestReceiveMs = Math.max(slowestReceiveMs, msg(m))
    }
    handoffMs += sendMs + halfRttMs + slowestReceiveMs
    const hubDevice = devices[hub]!
    const hubSumMs = ((members.length - 1) * model.config.dim * 4 * 3) / (hubDevice.decodeGBs * 1e6)
    // Up and down the slowest member link (each way: transfer and the member's send or receive), the hub's additions,
    // and the hub's messages on the critical path: the last partial sum in, the n − 1 sums out.
    allreduceOnceMs = 2 * slowestMs + hubSumMs + members.length * msg(hub)
  }

  const graphs = wholeLayerGraphs(input, stage)
  let computeMs = graphs === null ? 0 : graphs * blockOverheadMs(input, hub)
  for (const l of layersOf(stage.layers)) {
    const layer = model.layers[l]!
    let attentionMs = 0
    let ffnMs = 0
    stage.tensorParallel.shards.forEach((shard, i) => {
      const device = devices[members[i]!]!
      const overheadMs = graphs === null ? blockOverheadMs(input, members[i]!) : 0
      if (shard.kvHeads.count > 0) attentionMs = Math.max(attentionMs, readMs(device, attentionShareBytes(model, layer, shard)) + overheadMs)
      if (shard.ffnColumns.count > 0) ffnMs = Math.max(ffnMs, readMs(device, ffnShareBytes(model, layer, shard)) + overheadMs)
    })
    computeMs += attentionMs + ffnMs
  }
  return { computeMs, allreduceMs: 2 * stage.layers.count * allreduceOnceMs, handoffMs }
}

/**
 * Graphs a one-device stage runs per token when it runs whole decoder layers per graph (as agent/shard-runner.ts does
 * for a peer without allreduce partners, with the 'gqa' attention kernel), or null when it runs one graph per block.
 */
export function wholeLayerGraphs(input: Pick<ClusterCostInput, 'model' | 'options'>, stage: Pick<StagePlan, 'devices' | 'layers' | 'tensorParallel'>): number | null {
  const perGraph = input.options?.layersPerGraph ?? Number.POSITIVE_INFINITY
  const shard = stage.tensorParallel.shards[0]
  if (stage.devices.length !== 1 || perGraph === 0 || !shard || attentionKernel(input.model.config.headDim) !== 'gqa') return null
  const layerBytes = layersOf(stage.layers).map((l) => {
    const layer = input.model.layers[l]!
    const a = attentionShareBytes(input.model, layer, shard)
    const f = ffnShareBytes(input.model, layer, shard)
    return a.denseBytes + a.nbitsBytes + f.denseBytes + f.nbitsBytes
  })
  return layerGroupSizes(layerBytes, perGraph, MAX_GRAPH_WEIGHT_BYTES).length
}

/** The master's final norm and classifier per token, ms. */
export function headCostMs(input: ClusterCostInput): number {
  const { model } = input
  const master = input.devices[0]!
  const bytes = model.classifierQuantized ? { denseBytes: 0, nbitsBytes: model.classifierBytes } : { denseBytes: model.classifierBytes, nbitsBytes: 0 }
  return readMs(master, bytes) + blockOverheadMs(input, 0)
}

/**
 * Predicted decode time per token of `plan` on the devices and links of `input` (see the module comment for the
 * model). Prefill is not modelled.
 * @throws RangeError when a stage names a device index outside `input.devices` or a layer outside the model
 */
export function predictClusterPlan(input: ClusterCostInput, plan: Pick<ClusterPlan, 'stages'>): PlanCost {
  let computeMs = 0
  let allreduceMs = 0
  let handoffMs = 0
  for (const stage of plan.stages) {
    for (const d of stage.devices) {
      if (!Number.isInteger(d) || d < 0 || d >= input.devices.length) throw new RangeError(`cannot cost a stage on device ${d}: there are ${input.devices.length} devices`)
    }
    if (stage.layers.start < 0 || stage.layers.start + stage.layers.count > input.model.layers.length) {
      throw new RangeError(`cannot cost ${formatLayers(stage.layers.start, stage.layers.count)}: the model has ${formatLayers(0, input.model.layers.length)}`)
    }
    const c = stageCost(input, stage)
    computeMs += c.computeMs
    allreduceMs += c.allreduceMs
    handoffMs += c.handoffMs
  }
  const headMs = headCostMs(input)
  return { computeMs, allreduceMs, handoffMs, headMs, totalMs: computeMs + allreduceMs + handoffMs + headMs }
}
