/**
 * `--plan` and `--plan-file`: which cluster plan `run`, `serve` and `emulate` execute (device 0 = this master,
 * device i = worker i in the order of `--workers` or the local workers).
 */
import { readFileSync } from 'node:fs'
import {
  buildClusterPlan,
  type ClusterPlan,
  checkClusterPlan,
  hybridClusterPlan,
  type ModelDescription,
  parseStageLayout,
  pipelineClusterPlan,
  type StagePlanOptions,
  tensorParallelClusterPlan,
} from '../../splitter/index.ts'
import { planConstraints } from '../cluster.ts'
import { UsageError } from '../errors.ts'

/** Plan kinds `--plan` names (anything else is a stage layout such as `0+1:2,2+3:3`). */
export const PLAN_KINDS = ['tp', 'pipeline', 'hybrid', 'auto'] as const

/** Help text of `--plan`. */
export const PLAN_HELP =
  'cluster plan: tp (tensor parallel; the default of run and serve), pipeline (one device per layer range), hybrid (pairs of devices ' +
  'tensor-parallel, pipelined), auto (the planner: on the cluster file in emulate, where it is the default; elsewhere on the agents\' ' +
  'published measurements and measured links), or stages such as 0+1:2,2+3:3 ' +
  '(devices joined by +, a colon, its layer count; device 0 = this master, i = worker i)'

/** The flags this module reads. */
export interface PlanFlags {
  plan?: string
  planFile?: string
  quantizedMatmul?: 'exact' | 'int8'
}

/**
 * The cluster plan the flags ask for over `nDevices` devices (master included).
 * @param auto the planner's choice for `--plan auto`, where device profiles are known (`emulate`); absent = refused.
 * @throws UsageError for both flags, an unreadable or non-JSON plan file, or `auto` without profiles; RangeError from
 *   the builders or the plan check, naming the numbers.
 */
export function resolvePlan(flags: PlanFlags, model: ModelDescription, nDevices: number, auto?: () => ClusterPlan): ClusterPlan {
  if (flags.plan !== undefined && flags.planFile !== undefined) throw new UsageError('give --plan or --plan-file, not both')
  const options: StagePlanOptions = { ...planConstraints(model), quantizedMatmul: flags.quantizedMatmul ?? 'exact' }
  if (flags.planFile !== undefined) {
    let value: unknown
    try {
      value = JSON.parse(readFileSync(flags.planFile, 'utf8'))
    } catch (err) {
      throw new UsageError(`cannot read the plan file ${flags.planFile}: ${(err as Error).message}`)
    }
    // `edgeshard plan --json` prints the planner's choice ({ chosen: { plan } }) with its alternatives: take the plan.
    const chosen = (value as { chosen?: { plan?: unknown } } | null)?.chosen
    try {
      return checkClusterPlan(chosen?.plan ?? value, model.config, nDevices)
    } catch (err) {
      throw new RangeError(`plan file ${flags.planFile}: ${(err as Error).message}`)
    }
  }
  switch (flags.plan ?? 'tp') {
    case 'tp':
      return tensorParallelClusterPlan(model.config, nDevices, options)
    case 'pipeline':
      return pipelineClusterPlan(model.config, nDevices, options)
    case 'hybrid':
      return hybridClusterPlan(model.config, nDevices, options)
    case 'auto':
      if (!auto) throw new UsageError('--plan auto needs device profiles: use `edgeshard emulate --cluster FILE`, or --plan-file with a plan from `edgeshard plan`')
      return auto()
    default:
      return buildClusterPlan(model.config, parseStageLayout(flags.plan!), nDevices, options)
  }
}

/**
 * One line describing a plan: `tensor parallel: 2kv/58ffn 1kv/57ffn …` or, per stage, its layers, devices and shares
 * (`pipeline: layers 0..2 on device 0; layers 2..4 on device 1; …`).
 */
export function describePlan(plan: ClusterPlan): string {
  const shares = (s: ClusterPlan['stages'][number]): string => s.tensorParallel.shards.map((x) => `${x.kvHeads.count}kv/${x.ffnColumns.count}ffn`).join(' ')
  const excluded = plan.excluded.length > 0 ? `; left out: ${plan.excluded.map((e) => `device ${e.device} (${e.reason})`).join(', ')}` : ''
  const only = plan.stages[0]!
  if (plan.stages.length === 1 && only.devices.every((d, i) => d === i)) return `tensor parallel: ${shares(only)}${excluded}`
  const stages = plan.stages.map((s) => {
    const where = s.devices.length === 1 ? `device ${s.devices[0]}` : `devices ${s.devices.join('+')} (${shares(s)})`
    return `layers ${s.layers.start}..${s.layers.start + s.layers.count} on ${where}`
  })
  return `${plan.kind}: ${stages.join('; ')}${excluded}`
}
