/**
 * `edgeshard plan --model M --cluster cluster.json [--json]`: plans the model over the devices and links of a cluster
 * file (splitter/cluster-plan.ts) and prints the chosen plan (stages, layers, devices, shares), the alternatives with
 * their predicted ms/token, and why (excluded devices and reasons). Reads only the model's header and tensor table.
 */
import { basename } from 'node:path'
import { type Command, Option } from 'commander'
import { type ClusterSpec, clusterLink, readClusterFile } from '../../devices/index.ts'
import {
  type ClusterPlan,
  type ClusterPlanChoice,
  type ClusterPlanInput,
  formatLayers,
  loadModel,
  type ModelDescription,
  modelCostShape,
  planClusterChoice,
} from '../../splitter/index.ts'
import { WIRE_DTYPES, type WireDtype } from '../../transport/index.ts'
import { finiteNumber, wholeNumber } from './arguments.ts'

interface PlanFlags {
  model: string
  cluster: string
  json?: boolean
  context?: number
  blockOverheadMs?: number
  quantizedMatmul: 'exact' | 'int8'
  wireDtype: WireDtype
  layersPerGraph?: number
}

/** What planning takes besides the model and the cluster: the run's options that change its cost. */
export interface PlanningOptions {
  /** KV cache positions to plan memory for (default: the model's maxSeqLen). */
  readonly contextPositions?: number
  /** Block overhead of devices whose profile gives none, ms. */
  readonly blockOverheadMs?: number
  readonly quantizedMatmul?: 'exact' | 'int8'
  /** Element type of allreduce tensors on the wire (f16 halves the bytes each allreduce moves; hidden states stay f32). */
  readonly wireDtype?: WireDtype
  /** Most decoder layers per graph on a one-device stage (`--layers-per-graph`; 0 = per block). */
  readonly layersPerGraph?: number
}

/**
 * The planner's input for `model` on the devices and links of `cluster` (device 0 = master).
 * @throws RangeError when the model lacks a layer weight (see `modelCostShape`)
 */
export function clusterPlanInput(
  model: ModelDescription,
  cluster: ClusterSpec,
  options: PlanningOptions = {},
): ClusterPlanInput {
  return {
    model: modelCostShape(model),
    devices: cluster.devices.map((d) => ({
      name: d.name,
      decodeGBs: d.capabilities.decodeGBs,
      ...(d.capabilities.decodeNBitsGBs === undefined ? {} : { decodeNBitsGBs: d.capabilities.decodeNBitsGBs }),
      ...(d.capabilities.blockOverheadMs === undefined ? {} : { blockOverheadMs: d.capabilities.blockOverheadMs }),
      ...(d.capabilities.messageOverheadMs === undefined ? {} : { messageOverheadMs: d.capabilities.messageOverheadMs }),
      budgetBytes: d.memoryBudgetBytes,
    })),
    link: (a, b) => clusterLink(cluster, a, b),
    options: {
      ...(options.contextPositions === undefined ? {} : { contextPositions: options.contextPositions }),
      ...(options.blockOverheadMs === undefined ? {} : { blockOverheadMs: options.blockOverheadMs }),
      ...(options.quantizedMatmul === undefined ? {} : { quantizedMatmul: options.quantizedMatmul }),
      ...(options.wireDtype === undefined ? {} : { wireBytesPerValue: options.wireDtype === 'f16' ? 2 : 4 }),
      ...(options.layersPerGraph === undefined ? {} : { layersPerGraph: options.layersPerGraph }),
    },
  }
}

/**
 * The planner's choice for the devices and links of `spec` (their profiles' decode rates and memory budgets), as
 * `edgeshard plan` makes it.
 * @throws InsufficientMemoryError (from the planner) when no plan fits the budgets
 */
export function plannedFor(spec: ClusterSpec, model: ModelDescription, options: PlanningOptions = {}): ClusterPlan {
  return planClusterChoice(clusterPlanInput(model, spec, options)).chosen
}

/** The planning options of a run's flags (`--quantized-matmul`, `--wire-dtype`, `--layers-per-graph`). */
export function planningOptions(flags: { quantizedMatmul?: 'exact' | 'int8'; wireDtype?: WireDtype; layersPerGraph?: number }): PlanningOptions {
  return {
    ...(flags.quantizedMatmul === undefined ? {} : { quantizedMatmul: flags.quantizedMatmul }),
    ...(flags.wireDtype === undefined ? {} : { wireDtype: flags.wireDtype }),
    ...(flags.layersPerGraph === undefined ? {} : { layersPerGraph: flags.layersPerGraph }),
  }
}

async function plan(flags: PlanFlags): Promise<void> {
  const cluster = readClusterFile(flags.cluster)
  const loaded = loadModel(flags.model)
  const model: ModelDescription = flags.context === undefined ? loaded : { ...loaded, config: { ...loaded.config, maxSeqLen: flags.context } }
  const input = clusterPlanInput(model, cluster, {
    ...(flags.blockOverheadMs === undefined ? {} : { blockOverheadMs: flags.blockOverheadMs }),
    ...planningOptions(flags),
  })
  const choice = planClusterChoice(input)
  if (flags.json) {
    process.stdout.write(`${JSON.stringify(planJson(model, cluster, choice), null, 2)}\n`)
    return
  }
  process.stdout.write(formatPlan(model, cluster, input, choice))
}

/** The JSON `--json` prints: the chosen plan in full (executable), the alternatives summarised, the reasons. */
export function planJson(model: ModelDescription, cluster: ClusterSpec, choice: ClusterPlanChoice): unknown {
  const chosen = choice.alternatives[0]!
  return {
    model: { path: model.path, format: model.format, nLayers: model.config.nLayers, contextPositions: model.config.maxSeqLen },
    cluster: cluster.path,
    devices: cluster.devices.map((d) => ({ name: d.name, profile: d.profile, ...d.capabilities, memoryBudgetBytes: d.memoryBudgetBytes })),
    chosen: { label: chosen.label, cost: chosen.cost, memoryBytes: chosen.memoryBytes, plan: choice.chosen },
    alternatives: choice.alternatives.map((a) => ({
      label: a.label,
      kind: a.plan.kind,
      predictedMsPerToken: a.plan.predictedMsPerToken,
      cost: a.cost,
      stages: a.plan.stages.map((s) => ({
        layers: s.layers,
        devices: s.devices.map((d) => cluster.devices[d]!.name),
        ffnColumns: s.tensorParallel.shards.map((x) => x.ffnColumns.count),
        kvHeads: s.tensorParallel.shards.map((x) => x.kvHeads.count),
      })),
      excluded: a.plan.excluded.map((e) => ({ device: cluster.devices[e.device]!.name, reason: e.reason })),
    })),
    reasons: choice.reasons,
  }
}

function human(bytes: number): string {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`
}

function range(start: number, count: number): string {
  return count === 0 ? 'none' : count === 1 ? `${start}` : `${start}–${start + count - 1}`
}

/** The plan, alternatives and reasons as lines for a terminal. */
export function formatPlan(model: ModelDescription, cluster: ClusterSpec, input: ClusterPlanInput, choice: ClusterPlanChoice): string {
  const c = model.config
  const name = (d: number): string => cluster.devices[d]!.name
  const chosen = choice.alternatives[0]!
  const out: string[] = []
  const dtypes = [...new Set([...model.tensors.values()].filter((t) => t.shape.length === 2).map((t) => t.dtype))].join('/')
  out.push(
    `${basename(model.path)}: ${c.nLayers} layers, dim ${c.dim}, ${c.nHeads} heads / ${c.nKvHeads} KV heads, FFN ${c.hiddenDim}, ${dtypes}, ` +
      `context ${c.maxSeqLen}; ${cluster.devices.length} devices (${basename(cluster.path)}, master ${name(0)})`,
  )
  out.push('')
  out.push(`chosen: ${chosen.plan.kind}, ${chosen.plan.predictedMsPerToken.toFixed(2)} ms/token predicted (${chosen.label})`)
  for (const [i, stage] of chosen.plan.stages.entries()) {
    out.push(
      `  stage ${i + 1}: ${formatLayers(stage.layers.start, stage.layers.count)} (${stage.layers.count}), ` +
        `${stage.devices.length === 1 ? 'one device' : `hub ${name(stage.devices[0]!)}`}`,
    )
    const width = Math.max(...stage.devices.map((d) => name(d).length))
    for (const [j, d] of stage.devices.entries()) {
      const s = stage.tensorParallel.shards[j]!
      out.push(
        `    ${name(d).padEnd(width)}  KV heads ${range(s.kvHeads.start, s.kvHeads.count)} (query heads ${range(s.heads.start, s.heads.count)}), ` +
          `FFN columns ${range(s.ffnColumns.start, s.ffnColumns.count)} (${s.ffnColumns.count}); ` +
          `${human(chosen.memoryBytes[d]!)} of ${human(input.devices[d]!.budgetBytes)} budget`,
      )
    }
  }
  out.push('')
  out.push('alternatives (predicted ms/token = compute + allreduce + hand-offs + head):')
  for (const a of choice.alternatives) {
    const k = a.cost
    out.push(
      `  ${a === chosen ? '*' : ' '} ${a.plan.predictedMsPerToken.toFixed(2).padStart(9)}  ${a.label}  ` +
        `(${k.computeMs.toFixed(2)} + ${k.allreduceMs.toFixed(2)} + ${k.handoffMs.toFixed(2)} + ${k.headMs.toFixed(2)}; ` +
        `${a.plan.stages.map((s) => `${formatLayers(s.layers.start, s.layers.count)}: ${s.devices.map(name).join('+')}`).join(' | ')})`,
    )
  }
  if (chosen.plan.excluded.length > 0) {
    out.push('')
    out.push('excluded:')
    for (const e of chosen.plan.excluded) out.push(`  ${name(e.device)}: ${e.reason}`)
  }
  out.push('')
  out.push('why:')
  for (const r of choice.reasons) out.push(`  ${r}`)
  return `${out.join('\n')}\n`
}

/** Registers `edgeshard plan` on `program`. */
export function registerPlan(program: Command): void {
  program
    .command('plan')
    .description('plan a model over the devices and links of a cluster file: tensor parallel, pipeline or hybrid, by predicted ms/token')
    .requiredOption('--model <path>', 'model (GGUF, llama2.c .bin, Hugging Face folder); only its header is read')
    .requiredOption('--cluster <file>', 'cluster file (JSON: devices with profiles and memory budgets, links; see README)')
    .option('--json', 'print the chosen plan in full, the alternatives and the reasons as JSON')
    .addOption(new Option('--context <n>', 'KV cache positions to plan memory for (default: what the model declares)').argParser(wholeNumber(1)))
    .addOption(
      new Option('--block-overhead-ms <ms>', "fixed cost of one block on a device whose profile gives none, in the cost model (default 0.05)").argParser(finiteNumber),
    )
    .addOption(new Option('--quantized-matmul <mode>', 'activations of Q4_0/Q8_0 matmuls carried in the plan').choices(['exact', 'int8']).default('int8'))
    .addOption(new Option('--wire-dtype <dtype>', 'allreduce tensors on the wire, as the run will send them').choices(WIRE_DTYPES).default('f32'))
    .addOption(
      new Option('--layers-per-graph <n>', 'most decoder layers per graph on a device alone in its stage, as the run will use (default: all; 0: per block)').argParser(
        wholeNumber(0),
      ),
    )
    .action(plan)
}
