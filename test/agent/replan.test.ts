/**
 * Re-planning after a membership change: the planner on measured profiles when every device has one (the
 * fastest plan that still gives every device a part), otherwise the even tensor-parallel split, saying which and why.
 */
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import type { DeviceCapabilities } from '../../devices/index.ts'
import { replanOver, type ReplanDevice } from '../../agent/replan.ts'
import { checkClusterPlan, type ClusterPlanInput, loadModel, modelCostShape, planClusterChoice } from '../../splitter/index.ts'
import { HAVE_MODELS, MODELS_DIR } from '../support/cli.ts'

const GiB = 2 ** 30
const fast: DeviceCapabilities = { memoryBytes: 8 * GiB, cores: 4, decodeGBs: 20, prefillGflops: 100, diskReadMBs: 500 }
const slow: DeviceCapabilities = { ...fast, decodeGBs: 0.05, prefillGflops: 1 }

describe.skipIf(!HAVE_MODELS)('replanOver (stories260K)', () => {
  const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
  const options = { nDevices: 4, quantizedMatmul: 'exact' as const }
  const used = (plan: { stages: readonly { devices: readonly number[] }[] }): number[] => [...new Set(plan.stages.flatMap((s) => s.devices))].sort()

  it('uses the planner when the master and every survivor published a profile, on their own device indices', () => {
    const devices: ReplanDevice[] = [
      { device: 0, capabilities: fast },
      { device: 1, capabilities: fast, rttMs: 0.5 },
      { device: 3, capabilities: fast, rttMs: 0.5 },
    ]
    const choice = replanOver(model, devices, options)
    expect(choice.by).toBe('planner')
    expect(choice.why).toMatch(/ms\/token predicted$/)
    // Device 2 (lost) has no part; 1 and 3 keep theirs; the plan checks against the cluster's 4 device indices.
    expect(used(choice.plan).filter((d) => d !== 0)).toEqual([1, 3])
    expect(() => checkClusterPlan(choice.plan, model.config, 4)).not.toThrow()
    // The planner's fastest alternative on the three devices that uses all of them (alone, it would keep the master
    // only: stories260K is too small to gain from more devices), renumbered.
    const planned = planClusterChoice({
      model: modelCostShape(model),
      devices: devices.map((d, i) => ({ name: i === 0 ? 'the master' : `worker ${d.device}`, decodeGBs: fast.decodeGBs, budgetBytes: fast.memoryBytes })),
      link: () => ({ rttMs: 0.5, mbps: 250 }),
      options: { quantizedMatmul: 'exact' },
    })
    const renumber = [0, 1, 3]
    const everyone = planned.alternatives.find((a) => [1, 2].every((i) => a.plan.stages.some((s) => s.devices.includes(i))))!
    expect(choice.plan.stages.map((s) => ({ layers: s.layers, devices: s.devices }))).toEqual(
      everyone.plan.stages.map((s) => ({ layers: s.layers, devices: s.devices.map((i) => renumber[i]) })),
    )
  })

  it('falls back to the even split, naming the devices without a profile', () => {
    const choice = replanOver(model, [{ device: 0, capabilities: fast }, { device: 1 }, { device: 3, capabilities: fast }], options)
    expect(choice.by).toBe('even')
    expect(choice.why).toBe('worker 1 published no measured profile')
    expect(choice.plan.kind).toBe('tensor-parallel')
    expect(choice.plan.stages.map((s) => s.devices)).toEqual([[0, 1, 3]])
    expect(choice.plan.stages[0]!.tensorParallel.shards.map((s) => s.kvHeads.count)).toEqual([2, 1, 1]) // 4 KV heads, even shares
    const noMaster = replanOver(model, [{ device: 0 }, { device: 2, capabilities: fast }], options)
    expect(noMaster).toMatchObject({ by: 'even', why: 'the master published no measured profile' })
    expect(replanOver(model, [{ device: 0, capabilities: fast }, { device: 2, capabilities: fast }], { ...options, usePlanner: false })).toMatchObject({
      by: 'even',
      why: 'the planner is off',
    })
  })

  it('keeps every survivor: a plan that leaves a slow one out is passed over for the fastest that uses it', () => {
    const devices: ReplanDevice[] = [
      { device: 0, capabilities: fast },
      { device: 2, capabilities: fast, rttMs: 0.5 },
      { device: 3, capabilities: slow, rttMs: 0.5 },
    ]
    let chosenAlone: number[] = []
    const choice = replanOver(model, devices, {
      ...options,
      planner: (input: ClusterPlanInput) => {
        const c = planClusterChoice(input)
        chosenAlone = used(c.chosen)
        return c
      },
    })
    expect(chosenAlone).not.toContain(2) // the planner alone would drop the slow device (local index 2)
    expect(choice.by).toBe('planner')
    expect(used(choice.plan)).toContain(3)
    expect(used(choice.plan)).toContain(2)
  })

  it('falls back to the even split when the planner finds nothing or throws', () => {
    const devices: ReplanDevice[] = [{ device: 0, capabilities: fast }, { device: 1, capabilities: fast }]
    const empty = replanOver(model, devices, { ...options, planner: (input) => ({ ...planClusterChoice(input), alternatives: [] }) })
    expect(empty).toMatchObject({ by: 'even', why: 'no plan of the planner gives all 2 devices a part' })
    const thrown = replanOver(model, devices, {
      ...options,
      planner: () => {
        throw new RangeError('cannot fit the model')
      },
    })
    expect(thrown).toMatchObject({ by: 'even', why: 'the planner found no plan: cannot fit the model' })
    expect(thrown.plan.stages.map((s) => s.devices)).toEqual([[0, 1]])
  })

  it('refuses a device list without the master first', () => {
    expect(() => replanOver(model, [{ device: 1, capabilities: fast }], options)).toThrow(RangeError)
  })
})
