/** Cluster plans of a given shape (pipeline, hybrid, stage layouts) and the check of plans read from files. Pure. */
import { describe, expect, it } from 'vitest'
import {
  buildClusterPlan,
  checkClusterPlan,
  evenLayerCounts,
  hybridClusterPlan,
  type LlamaConfig,
  parseStageLayout,
  pipelineClusterPlan,
  tensorParallelClusterPlan,
} from '../../splitter/index.ts'

// stories260K's shape: 5 layers, 8 query heads over 4 KV heads, FFN width 172.
const CONFIG: LlamaConfig = {
  arch: 'llama',
  dim: 64,
  hiddenDim: 172,
  nLayers: 5,
  nHeads: 8,
  nKvHeads: 4,
  headDim: 8,
  vocabSize: 512,
  maxSeqLen: 512,
  normEps: 1e-5,
  ropeTheta: 10000,
  ropeStyle: 'adjacent',
}

const layout = (plan: { stages: readonly { devices: readonly number[]; layers: { start: number; count: number } }[] }): string[] =>
  plan.stages.map((s) => `${s.devices.join('+')}@${s.layers.start}+${s.layers.count}`)

describe('stage plans', () => {
  it('spreads layers evenly, earlier stages taking the remainder', () => {
    expect(evenLayerCounts(5, 3)).toEqual([2, 2, 1])
    expect(evenLayerCounts(22, 4)).toEqual([6, 6, 5, 5])
    expect(() => evenLayerCounts(5, 6)).toThrow(/cannot spread 5 layers over 6 pipeline stages/)
  })

  it('builds tensor-parallel, pipeline and hybrid plans whose stages carry their own layer ranges', () => {
    const tp = tensorParallelClusterPlan(CONFIG, 3)
    expect(tp.kind).toBe('tensor-parallel')
    expect(layout(tp)).toEqual(['0+1+2@0+5'])
    expect(tp.stages[0]!.tensorParallel.shards.map((s) => s.kvHeads.count)).toEqual([2, 1, 1])

    const pipe = pipelineClusterPlan(CONFIG, 3)
    expect(pipe.kind).toBe('pipeline')
    expect(layout(pipe)).toEqual(['0@0+2', '1@2+2', '2@4+1'])
    for (const s of pipe.stages) {
      expect(s.tensorParallel.layers).toEqual(s.layers)
      expect(s.tensorParallel.shards).toHaveLength(1)
    }

    const hybrid = hybridClusterPlan(CONFIG, 4)
    expect(hybrid.kind).toBe('hybrid')
    expect(layout(hybrid)).toEqual(['0+1@0+3', '2+3@3+2'])
    expect(layout(hybridClusterPlan(CONFIG, 5))).toEqual(['0+1@0+2', '2+3@2+2', '4@4+1'])
    expect(() => hybridClusterPlan(CONFIG, 2)).toThrow(/need at least 3/)
  })

  it('reads stage layouts and lists the devices left out (never the master)', () => {
    expect(parseStageLayout('0+1:2, 2+3:3')).toEqual([
      { devices: [0, 1], layers: 2 },
      { devices: [2, 3], layers: 3 },
    ])
    expect(() => parseStageLayout('0+1:2;2:3')).toThrow(/invalid plan '0\+1:2;2:3': expected tp, pipeline, hybrid, auto or stages .*\(stage '0\+1:2;2:3'\)/)
    const plan = buildClusterPlan(CONFIG, parseStageLayout('1+2:3,4:2'), 5)
    expect(plan.kind).toBe('hybrid')
    expect(plan.excluded).toEqual([{ device: 3, reason: 'not in the plan' }])
  })

  it('refuses layouts that miss layers, repeat a device, or do not lead with the master', () => {
    expect(() => buildClusterPlan(CONFIG, parseStageLayout('0:2,1:2'), 2)).toThrow(/adding up to the model's 5 layers/)
    expect(() => buildClusterPlan(CONFIG, parseStageLayout('0:2,0:3'), 2)).toThrow(/device 0 is in more than one stage/)
    expect(() => buildClusterPlan(CONFIG, parseStageLayout('1+0:5'), 2)).toThrow(/must be the stage's first device/)
    expect(() => buildClusterPlan(CONFIG, parseStageLayout('0:2,3:3'), 3)).toThrow(/names device 3: the cluster has devices 0..2/)
    expect(() => buildClusterPlan(CONFIG, parseStageLayout('0+1+2+3+4:5'), 5)).not.toThrow()
  })

  it('checks a plan from a file: its own plans pass, damaged ones fail naming the stage', () => {
    const plan = JSON.parse(JSON.stringify(hybridClusterPlan(CONFIG, 4)))
    expect(checkClusterPlan(plan, CONFIG, 4)).toEqual(plan)
    expect(() => checkClusterPlan(plan, CONFIG, 3)).toThrow(/names device 3/)
    expect(() => checkClusterPlan({ ...plan, kind: 'pipeline' }, CONFIG, 4)).toThrow(/kind pipeline does not match its stages \(hybrid\)/)
    const gap = JSON.parse(JSON.stringify(plan))
    gap.stages[1].layers.start = 4
    expect(() => checkClusterPlan(gap, CONFIG, 4)).toThrow(/stage 1: layers .* must start at layer 3/)
    const shares = JSON.parse(JSON.stringify(plan))
    shares.stages[0].tensorParallel.shards[1].ffnColumns.count -= 1
    expect(() => checkClusterPlan(shares, CONFIG, 4)).toThrow(/stage 0: shards cover 4 of 4 KV heads and 171 of 172 FFN columns/)
    const model = JSON.parse(JSON.stringify(plan))
    model.stages[1].tensorParallel.model.dim = 32
    expect(() => checkClusterPlan(model, CONFIG, 4)).toThrow('cluster plan stage 1: the tensor-parallel plan is for another model (dim 32, the model has 64)')
    expect(() => checkClusterPlan({ kind: 'pipeline' }, CONFIG, 4)).toThrow(/not a cluster plan/)
  })
})
