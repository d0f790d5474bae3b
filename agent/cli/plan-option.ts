/**
 * `--plan` and `--plan-file`: which cluster plan `run`, `serve` and `emulate` execute (device 0 = this master,
 * device i = worker i in the order of `--workers` or the local workers).
 */
import { readFileSync } from 'node:fs'
import {
  buildClusterPlan,
  type ClusterPlan,
  checkClusterPlan,
  formatLayers,
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
 * Checks the devices a plan file's stages name against the cluster at hand: every index must exist, and where the file
 * names its devices (`edgeshard plan --json` lists them) and the cluster's names are known (`emulate`), the names must
 * agree.
 * @throws RangeError naming the file, the stage, the device and what the cluster has
 */
function checkPlanDevices(file: string, document: unknown, plan: unknown, nDevices: number, names: readonly string[] | undefined): void {
  const listed = (document as { devices?: unknown } | null)?.devices
  const fileName = (d: number): string | undefined => {
    const entry = Array.isArray(listed) ? (listed[d] as { name?: unknown } | undefined) : undefined
    return typeof entry?.name === 'string' ? entry.name : undefined
  }
  const have = names
    ? `${nDevices} device${nDevices === 1 ? '' : 's'} (${names.map((n, d) => `${d} = ${n}`).join(', ')})`
    : `${nDevices} device${nDevices === 1 ? '' : 's'} (the master${nDevices > 1 ? ` and ${nDevices - 1} worker${nDevices > 2 ? 's' : ''}` : ''})`
  const stages = (plan as { stages?: unknown } | null)?.stages
  if (!Array.isArray(stages)) return // the plan check names what is wrong
  for (const [i, stage] of stages.entries()) {
    const devices = (stage as { devices?: unknown } | null)?.devices
    if (!Array.isArray(devices)) continue
    for (const d of devices) {
      if (typeof d !== 'number' || !Number.isInteger(d)) continue
      const named = fileName(d)
      if (d < 0 || d >= nDevices) {
        throw new RangeError(`plan file ${file}: stage ${i} runs on device ${d}${named ? ` (${named})` : ''}, which does not exist: this cluster has ${have}`)
      }
      if (named !== undefined && names !== undefined && names[d] !== named) {
        throw new RangeError(`plan file ${file}: device ${d} is ${JSON.stringify(named)} in the plan but ${JSON.stringify(names[d])} in this cluster, which has ${have}`)
      }
    }
  }
}

/**
 * The cluster plan the flags ask for over `nDevices` devices (master included).
 * @param auto the planner's choice for `--plan auto`; absent = refused.
 * @param deviceNames the devices' real names (`emulate`: the cluster file's), checked against a plan file's.
 * @throws UsageError for both flags, an unreadable or non-JSON plan file, or `auto` without a planner; RangeError from
 *   the builders or the plan check, naming the numbers (and the plan file).
 */
export function resolvePlan(
  flags: PlanFlags,
  model: ModelDescription,
  nDevices: number,
  auto?: () => ClusterPlan,
  deviceNames?: readonly string[],
): ClusterPlan {
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
    const plan = chosen?.plan ?? value
    checkPlanDevices(flags.planFile, value, plan, nDevices, deviceNames)
    try {
      return checkClusterPlan(plan, model.config, nDevices)
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
    return `${formatLayers(s.layers.start, s.layers.count)} on ${where}`
  })
  return `${plan.kind}: ${stages.join('; ')}${excluded}`
}
