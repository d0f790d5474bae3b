import { describe, expect, it } from 'vitest'
import {
  type ClusterPlan,
  type ClusterPlanInput,
  InsufficientMemoryError,
  type LlamaConfig,
  type PlannerDevice,
  type PlannerLink,
  planClusterChoice,
  planEvenTensorParallel,
  planMemoryBytes,
  predictClusterPlan,
  SYNTH_SHAPES,
  uniformModelCostShape,
  waterFill,
  wholeLayerGraphs,
} from '../../splitter/index.ts'

const TINYLLAMA: LlamaConfig = SYNTH_SHAPES['tinyllama-1.1b']!.config
const MODEL = uniformModelCostShape(TINYLLAMA, 'q4_0')
const MB = 1e6

/** Resident bytes of one TinyLlama Q4_0 layer: 9 437 184 attention + 34 603 008 FFN weights × 20/32. */
const LAYER_BYTES = (2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 5632 * 2048) * (20 / 32)

function device(name: string, decodeGBs: number, budgetBytes = 4e9): PlannerDevice {
  return { name, decodeGBs, budgetBytes }
}

function uniformLinks(rttMs: number, mbps = 1000): (a: number, b: number) => PlannerLink {
  return () => ({ rttMs, mbps })
}

/** Every layer exactly once in layer order; every stage's shards: whole KV heads with their query heads, FFN blocks. */
function expectValid(plan: ClusterPlan, config: LlamaConfig, ffnBlock: number, nDevices: number): void {
  let next = 0
  const used = new Set<number>()
  for (const stage of plan.stages) {
    expect(stage.layers.start).toBe(next)
    expect(stage.layers.count).toBeGreaterThan(0)
    next += stage.layers.count
    expect(stage.tensorParallel.layers).toEqual(stage.layers)
    expect(stage.tensorParallel.shards).toHaveLength(stage.devices.length)
    for (const d of stage.devices) {
      expect(used.has(d)).toBe(false)
      used.add(d)
      expect(d).toBeGreaterThanOrEqual(0)
      expect(d).toBeLessThan(nDevices)
    }
    if (stage.devices.includes(0)) expect(stage.devices[0]).toBe(0)
    const group = config.nHeads / config.nKvHeads
    let kv = 0
    let ffn = 0
    for (const s of stage.tensorParallel.shards) {
      expect(s.kvHeads.start).toBe(kv)
      expect(s.heads).toEqual({ start: s.kvHeads.start * group, count: s.kvHeads.count * group })
      expect(s.ffnColumns.start).toBe(ffn)
      expect(s.ffnColumns.count % ffnBlock).toBe(0)
      expect(s.kvHeads.count + s.ffnColumns.count).toBeGreaterThan(0)
      kv += s.kvHeads.count
      ffn += s.ffnColumns.count
    }
    expect(kv).toBe(config.nKvHeads)
    expect(ffn).toBe(config.hiddenDim)
  }
  expect(next).toBe(config.nLayers)
  for (const e of plan.excluded) expect(used.has(e.device)).toBe(false)
}

describe('waterFill', () => {
  it('splits in proportion to speed, capping members at their memory fraction', () => {
    expect(waterFill([2, 1, 1], [1, 1, 1])).toEqual([0.5, 0.25, 0.25])
    const f = waterFill([2, 1, 1], [0.2, 1, 1])!
    expect(f[0]).toBeCloseTo(0.2, 12)
    expect(f[1]).toBeCloseTo(0.4, 12)
    expect(f[2]).toBeCloseTo(0.4, 12)
    expect(waterFill([1, 1], [0.3, 0.3])).toBeNull()
  })
})

describe('planClusterChoice', () => {
  it('gives tensor-parallel shares in proportion to speed, within one block', () => {
    const speeds = [20, 10, 5]
    const input: ClusterPlanInput = {
      model: MODEL,
      devices: speeds.map((s, i) => device(`d${i}`, s)),
      link: uniformLinks(0.05, 10_000),
    }
    const { chosen } = planClusterChoice(input)
    expect(chosen.kind).toBe('tensor-parallel')
    expect(chosen.stages).toHaveLength(1)
    expect(chosen.stages[0]!.devices).toEqual([0, 1, 2])
    const total = speeds.reduce((a, b) => a + b, 0)
    const shards = chosen.stages[0]!.tensorParallel.shards
    shards.forEach((s, i) => {
      const ideal = (TINYLLAMA.hiddenDim * speeds[i]!) / total // 3218.3, 1609.1, 804.6 columns
      expect(Math.abs(s.ffnColumns.count - ideal)).toBeLessThan(MODEL.ffnBlock)
    })
    expect(shards.map((s) => s.ffnColumns.count)).toEqual([3232, 1600, 800])
    // 4 KV heads by 4/7, 2/7, 1/7 (largest remainder): 2, 1, 1.
    expect(shards.map((s) => s.kvHeads.count)).toEqual([2, 1, 1])
    expectValid(chosen, TINYLLAMA, 32, 3)
  })

  it('shifts shares off a device whose memory budget cannot hold its speed share', () => {
    const input: ClusterPlanInput = {
      model: MODEL,
      // d0 is the fastest but may hold only ~250 MB besides the embedding and classifier.
      devices: [device('d0', 20, MODEL.masterBytes + 250 * MB), device('d1', 10), device('d2', 10)],
      link: uniformLinks(0.05, 10_000),
    }
    const choice = planClusterChoice(input)
    const plan = choice.chosen
    expect(plan.kind).toBe('tensor-parallel')
    const need = planMemoryBytes(input, plan)
    for (const [d, bytes] of need.entries()) expect(bytes).toBeLessThanOrEqual(input.devices[d]!.budgetBytes)
    // Unconstrained, d0 would take half the FFN columns (2816); its budget keeps it well below.
    expect(plan.stages[0]!.tensorParallel.shards[0]!.ffnColumns.count).toBeLessThan(2400)
    expectValid(plan, TINYLLAMA, 32, 3)
  })

  it('fails with InsufficientMemoryError naming the device and the bytes it lacks', () => {
    const budget = 300 * MB
    const input: ClusterPlanInput = { model: MODEL, devices: [device('pi-a', 3.5, budget)], link: uniformLinks(1) }
    const weights = 22 * LAYER_BYTES
    const kv = 2 * 4 * 64 * 2048 * 4 * 23
    const needed = weights + kv + MODEL.masterBytes
    let error: unknown
    try {
      planClusterChoice(input)
    } catch (err) {
      error = err
    }
    expect(error).toBeInstanceOf(InsufficientMemoryError)
    const e = error as InsufficientMemoryError
    expect(e.name).toBe('InsufficientMemoryError')
    expect(e.neededBytes).toBeCloseTo(needed, 0)
    expect(e.lackingBytes).toBeCloseTo(needed - budget, 0)
    expect(e.message).toContain('pi-a')
    expect(e.message).toContain(`${Math.round(needed - budget)} bytes`)
    expect(e.message).not.toContain('\n')
  })

  it('names the master when its budget cannot hold the embedding and classifier', () => {
    const input: ClusterPlanInput = {
      model: MODEL,
      devices: [device('phone', 15, 50 * MB), device('laptop', 50)],
      link: uniformLinks(1),
    }
    expect(() => planClusterChoice(input)).toThrow(InsufficientMemoryError)
    try {
      planClusterChoice(input)
    } catch (err) {
      const e = err as InsufficientMemoryError
      expect(e.devices).toEqual([{ name: 'phone', budgetBytes: 50 * MB }])
      expect(e.lackingBytes).toBe(MODEL.masterBytes - 50 * MB)
      expect(e.message).toContain(`master phone`)
    }
  })

  it('chooses a pipeline over 5 ms links and tensor parallelism over 0.1 ms links', () => {
    // Four equal devices, none able to hold the model alone (~784 MB with KV cache, embedding and classifier).
    const devices = ['a', 'b', 'c', 'd'].map((n, i) => device(n, 10, (i === 0 ? MODEL.masterBytes : 0) + 350 * MB))
    const slow = planClusterChoice({ model: MODEL, devices, link: uniformLinks(5, 100) })
    expect(['pipeline', 'hybrid']).toContain(slow.chosen.kind)
    expect(slow.chosen.stages.length).toBeGreaterThan(1)
    const fast = planClusterChoice({ model: MODEL, devices, link: uniformLinks(0.1, 1000) })
    expect(fast.chosen.kind).toBe('tensor-parallel')
    expect(fast.chosen.stages[0]!.devices).toHaveLength(4)
    for (const choice of [slow, fast]) {
      expect(choice.alternatives[0]!.plan).toBe(choice.chosen)
      for (const alt of choice.alternatives) {
        expectValid(alt.plan, TINYLLAMA, 32, 4)
        planMemoryBytes({ model: MODEL, devices, link: uniformLinks(1) }, alt.plan).forEach((bytes, d) => {
          expect(bytes).toBeLessThanOrEqual(devices[d]!.budgetBytes)
        })
      }
      const ms = choice.alternatives.map((a) => a.plan.predictedMsPerToken)
      expect(ms).toEqual([...ms].sort((x, y) => x - y))
    }
    // 5 ms links: two allreduces per layer cost ≥ 2 × 22 × 5 ms = 220 ms for any multi-device tensor-parallel plan.
    const tp = slow.alternatives.find((a) => a.plan.kind === 'tensor-parallel')
    if (tp) expect(tp.cost.allreduceMs).toBeGreaterThan(220)
  })

  it('chooses a hybrid plan: tensor parallel inside two LAN islands, pipelined across a 10 ms link', () => {
    // {laptop, phone} and {pi-a, pi-b}: 0.1 ms inside an island, 10 ms across; no island holds the model alone.
    const devices = [
      device('laptop', 20, MODEL.masterBytes + 250 * MB),
      device('phone', 20, 250 * MB),
      device('pi-a', 20, 250 * MB),
      device('pi-b', 20, 250 * MB),
    ]
    const island = (d: number): number => (d < 2 ? 0 : 1)
    const link = (a: number, b: number): PlannerLink => (island(a) === island(b) ? { rttMs: 0.1, mbps: 1000 } : { rttMs: 10, mbps: 100 })
    const { chosen, alternatives, reasons } = planClusterChoice({ model: MODEL, devices, link })
    expect(chosen.kind).toBe('hybrid')
    expect(chosen.stages.map((s) => [...s.devices].sort())).toEqual([
      [0, 1],
      [2, 3],
    ])
    expectValid(chosen, TINYLLAMA, 32, 4)
    expect(reasons[0]).toMatch(/^chose hybrid/)
    // Each stage's hand-offs: master → pi hub → master = 10 ms; allreduces stay inside the islands.
    const cost = alternatives[0]!.cost
    expect(cost.handoffMs).toBeGreaterThan(10)
    expect(cost.allreduceMs).toBeLessThan(22 * 2 * 2 * 0.2)
  })

  it('leaves out a device too slow to help, with the reason', () => {
    const devices = [device('fast-a', 20), device('fast-b', 20), device('slow', 0.2)]
    const { chosen, alternatives } = planClusterChoice({ model: MODEL, devices, link: uniformLinks(0.1, 1000) })
    expect(chosen.stages.flatMap((s) => s.devices)).not.toContain(2)
    expect(chosen.excluded).toHaveLength(1)
    expect(chosen.excluded[0]!.device).toBe(2)
    expect(chosen.excluded[0]!.reason).toMatch(/^too slow to help: the fastest plan using it \(.+\) predicts [\d.]+ ms\/token, [\d.]+ without it$/)
    const withSlow = alternatives.find((a) => a.plan.stages.some((s) => s.devices.includes(2)))!
    expect(withSlow.cost.totalMs).toBeGreaterThan(chosen.predictedMsPerToken)
  })

  it('predicts a single device as bytes / rate plus one overhead per graph (whole layers), or per block', () => {
    const d = device('solo', 8)
    const { chosen, alternatives } = planClusterChoice({ model: MODEL, devices: [d], link: uniformLinks(1) })
    const headMs = MODEL.classifierBytes / (8 * 1e6) + 0.05
    // Alone in its stage the device runs all 22 layers as one graph (under MAX_GRAPH_WEIGHT_BYTES): one overhead.
    expect(wholeLayerGraphs({ model: MODEL }, chosen.stages[0]!)).toBe(1)
    expect(chosen.predictedMsPerToken).toBeCloseTo(22 * (LAYER_BYTES / (8 * 1e6)) + 0.05 + headMs, 9)
    expect(alternatives[0]!.cost).toMatchObject({ allreduceMs: 0, handoffMs: 0 })
    expect(chosen.kind).toBe('tensor-parallel')
    // --layers-per-graph 8: graphs of 8, 7 and 7 layers; 0: two blocks per layer, each with its overhead.
    expect(wholeLayerGraphs({ model: MODEL, options: { layersPerGraph: 8 } }, chosen.stages[0]!)).toBe(3)
    const perBlock = planClusterChoice({ model: MODEL, devices: [d], link: uniformLinks(1), options: { layersPerGraph: 0 } })
    expect(perBlock.chosen.predictedMsPerToken).toBeCloseTo(22 * (LAYER_BYTES / (8 * 1e6) + 2 * 0.05) + headMs, 9)
  })

  it("charges each device its own per-block overhead, else the options', else the default", () => {
    const perLayerMs = (overheadMs: number): number => LAYER_BYTES / (8 * 1e6) + 2 * overheadMs
    const headMs = (overheadMs: number): number => MODEL.classifierBytes / (8 * 1e6) + overheadMs
    const perBlock = { layersPerGraph: 0 }
    const own = planClusterChoice({ model: MODEL, devices: [{ ...device('solo', 8), blockOverheadMs: 0.4 }], link: uniformLinks(1), options: perBlock })
    expect(own.chosen.predictedMsPerToken).toBeCloseTo(22 * perLayerMs(0.4) + headMs(0.4), 9)
    const options = planClusterChoice({ model: MODEL, devices: [device('solo', 8)], link: uniformLinks(1), options: { ...perBlock, blockOverheadMs: 0.2 } })
    expect(options.chosen.predictedMsPerToken).toBeCloseTo(22 * perLayerMs(0.2) + headMs(0.2), 9)
    // In a stage, a block takes as long as its slowest member, overhead included: the slow device's 2 ms dominates.
    const devices = [device('a', 8), { ...device('b', 8), blockOverheadMs: 2 }]
    const input: ClusterPlanInput = { model: MODEL, devices, link: uniformLinks(0) }
    const even = planEvenTensorParallel(input)
    expect(predictClusterPlan(input, even).computeMs).toBeCloseTo(22 * (LAYER_BYTES / 2 / (8 * 1e6) + 2 * 2), 6)
    expect(() => planClusterChoice({ ...input, devices: [{ ...device('x', 8), blockOverheadMs: -1 }] })).toThrow(/device x: blockOverheadMs is -1/)
  })

  it('charges f16 on the wire half the bytes of each allreduce; hidden states stay f32', () => {
    const devices = [device('a', 8), device('b', 8)]
    const slow = (a: number, b: number) => (a === b ? { rttMs: 0, mbps: Number.POSITIVE_INFINITY } : { rttMs: 0, mbps: 1 })
    const input: ClusterPlanInput = { model: MODEL, devices, link: slow }
    const even = planEvenTensorParallel(input)
    const f32Cost = predictClusterPlan(input, even)
    const f16Cost = predictClusterPlan({ ...input, options: { wireBytesPerValue: 2 } }, even)
    const f32 = f32Cost.allreduceMs
    const f16 = f16Cost.allreduceMs
    // The broadcast of x to the stage's member is a hidden state: f32 either way.
    expect(f16Cost.handoffMs).toBeCloseTo(f32Cost.handoffMs, 9)
    expect(f32Cost.handoffMs).toBeCloseTo((MODEL.config.dim * 4 * 8) / 1e3, 9)
    // No rtt, no per-message cost: only the bytes, 2 × dim × 4 (or 2) bytes at 1 Mbit/s per allreduce, 44 of them.
    expect(f32).toBeCloseTo(44 * 2 * ((MODEL.config.dim * 4 * 8) / 1e3) + 44 * ((MODEL.config.dim * 4 * 3) / (8 * 1e6)), 6)
    expect(f16).toBeCloseTo(44 * 2 * ((MODEL.config.dim * 2 * 8) / 1e3) + 44 * ((MODEL.config.dim * 4 * 3) / (8 * 1e6)), 6)
  })

  it('charges the per-message cost: 2 × member + n × hub per allreduce, the broadcast, the stage hand-offs', () => {
    const m = 0.1
    const h = 0.3
    const devices = [{ ...device('hub', 10), messageOverheadMs: h }, ...['w1', 'w2', 'w3'].map((n) => ({ ...device(n, 10), messageOverheadMs: m }))]
    const input: ClusterPlanInput = { model: MODEL, devices, link: uniformLinks(1) }
    const free: ClusterPlanInput = { ...input, devices: devices.map(({ messageOverheadMs: _, ...d }) => d) }
    const tp = planEvenTensorParallel(input)
    const withCost = predictClusterPlan(input, tp)
    const without = predictClusterPlan(free, tp)
    // 44 allreduces: the slowest member's send and receive, the hub's last partial in and its 3 sums out.
    expect(withCost.allreduceMs - without.allreduceMs).toBeCloseTo(44 * (2 * m + 4 * h), 9)
    // Broadcast of x at the start of the token: the hub's 3 sends, the last member's receive.
    expect(withCost.handoffMs - without.handoffMs).toBeCloseTo(3 * h + m, 9)
    expect(withCost.computeMs).toBe(without.computeMs)
    // A pipeline stage on a worker: master → hub and back, a send and a receive on each side.
    const pipeline = { stages: [{ ...tp.stages[0]!, devices: [1], tensorParallel: planEvenTensorParallel({ ...input, devices: [devices[1]!] }).stages[0]!.tensorParallel }] }
    expect(predictClusterPlan(input, pipeline).handoffMs - predictClusterPlan(free, pipeline).handoffMs).toBeCloseTo(2 * h + 2 * m, 9)
    // The options give the cost of devices without their own.
    expect(predictClusterPlan({ ...free, options: { messageOverheadMs: m } }, tp).allreduceMs - without.allreduceMs).toBeCloseTo(44 * (2 * m + 4 * m), 9)
  })

  it('beats the even split by ≥ 20 % on one fast and three slow devices (1 ms links)', () => {
    const devices = [device('fast', 20), device('slow-1', 5), device('slow-2', 5), device('slow-3', 5)]
    const input: ClusterPlanInput = { model: MODEL, devices, link: uniformLinks(1, 1000) }
    const even = planEvenTensorParallel(input)
    expect(even.stages[0]!.tensorParallel.shards.map((s) => s.ffnColumns.count)).toEqual([1408, 1408, 1408, 1408])
    expect(even.predictedMsPerToken).toBeCloseTo(predictClusterPlan(input, even).totalMs, 9)
    const { chosen, reasons } = planClusterChoice(input)
    expect(chosen.predictedMsPerToken).toBeLessThanOrEqual(0.8 * even.predictedMsPerToken)
    expect(reasons.some((r) => r.startsWith('even split over all 4 devices'))).toBe(true)
  })

  it('plans stories260K-sized f32 models with FFN blocks of one column', () => {
    const config: LlamaConfig = { ...TINYLLAMA, dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, headDim: 8, vocabSize: 512, maxSeqLen: 512 }
    const model = uniformModelCostShape(config, 'f32', { sharedClassifier: true })
    expect(model.ffnBlock).toBe(1)
    const devices = [device('m', 5), device('w1', 5), device('w2', 5)]
    for (const rttMs of [0.01, 5]) {
      const { alternatives } = planClusterChoice({ model, devices, link: uniformLinks(rttMs) })
      for (const alt of alternatives) expectValid(alt.plan, config, 1, 3)
    }
  })

  it('refuses malformed devices with a RangeError naming the device', () => {
    expect(() => planClusterChoice({ model: MODEL, devices: [device('x', Number.NaN)], link: uniformLinks(1) })).toThrow(/device x: decodeGBs is NaN/)
    expect(() => planClusterChoice({ model: MODEL, devices: [], link: uniformLinks(1) })).toThrow(RangeError)
  })
})
