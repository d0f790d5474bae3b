/**
 * Decode step of one peer through every layer, graph layouts side by side: one graph per attention and FFN block
 * (`--layers-per-graph 0`, as peers with allreduce partners run) against whole-layer graphs of 1, 8 or all layers.
 * TinyLlama-1.1B shape Q4_0 (synthetic), int8 activations, weights resident. All layouts live in one process and take
 * decode steps in turn (the order rotates each step), so load on a shared machine hits them alike; every step runs
 * all 22 layers, so weights are read from memory as in real decoding, not from cache. Reports wall and CPU ms per
 * token (median, quartile, min) with the load average. Prints JSON.
 * `npm run bench:layouts [-- --steps 60 --context 128 --layouts 0,1,8,22 --threads 2]`.
 */
import { cpus, loadavg } from 'node:os'
import { parseArgs } from 'node:util'
import { ShardRunner } from '../agent/shard-runner.ts'
import {
  loadModel,
  ModelWeights,
  planTensorParallel,
  sliceLayerShard,
} from '../splitter/index.ts'
import { createInProcessAllreduce } from '../transport/index.ts'
import { synthModel } from './support.ts'

const { values } = parseArgs({
  options: {
    steps: { type: 'string', default: '60' },
    context: { type: 'string', default: '128' },
    layouts: { type: 'string', default: '0,1,8,22' },
    threads: { type: 'string', default: String(cpus().length) },
  },
})
const steps = Number(values.steps)
const context = Number(values.context) // positions in the KV cache before the first timed step
const layouts = values.layouts.split(',').map(Number)
const threads = Number(values.threads)

const path = synthModel('tinyllama-1.1b', 'q4_0')
const model = loadModel(path)
const plan = planTensorParallel({ ...model.config, maxSeqLen: context + steps }, 1, { quantizedMatmul: 'int8' })
const source = new ModelWeights(model)
const weights = Array.from({ length: plan.model.nLayers }, (_, layer) => sliceLayerShard(plan.model, plan.shards[0]!, layer, source))
const [allreduce] = createInProcessAllreduce(1)
const runners = []
for (const layersPerGraph of layouts) runners.push(await ShardRunner.create(plan, 0, weights, { threads, layersPerGraph }))

// A seeded hidden state stands in for token embeddings: the same prompt, then the same row each step.
let seed = 7
const random = (): number => {
  seed = (seed * 1103515245 + 12345) % 2147483648
  return seed / 2147483648 - 0.5
}
const dim = plan.model.dim
const prompt = Float32Array.from({ length: context * dim }, random) // [context, dim] f32
const row = Float32Array.from({ length: dim }, random) // [1, dim] f32
for (const r of runners) await r.forward(prompt.slice(), 0, 0, allreduce!)

const wallMs = runners.map(() => [] as number[])
const cpuMs = runners.map(() => [] as number[])
const loadBefore = loadavg()
for (let step = 0; step < steps; step++) {
  for (let j = 0; j < runners.length; j++) {
    const i = (j + step) % runners.length
    const cpu0 = process.cpuUsage()
    const t0 = performance.now()
    await runners[i]!.forward(row.slice(), context + step, step + 1, allreduce!)
    wallMs[i]!.push(performance.now() - t0)
    const cpu = process.cpuUsage(cpu0)
    cpuMs[i]!.push((cpu.user + cpu.system) / 1000)
  }
}
for (const r of runners) await r.release()

/** Median, lower quartile and minimum of `xs` without the first two steps (ORT's first runs of a shape), ms. */
function stats(xs: readonly number[]): { median: number; p25: number; min: number } {
  const s = xs.slice(2).sort((a, b) => a - b)
  const round = (x: number): number => Math.round(x * 100) / 100
  return { median: round(s[Math.floor(s.length / 2)]!), p25: round(s[Math.floor(s.length / 4)]!), min: round(s[0]!) }
}
console.log(
  JSON.stringify(
    {
      bench: 'decode-layouts',
      model: 'tinyllama-1.1b q4_0 (synthetic), int8 activations',
      threads,
      contextAtFirstStep: context,
      steps,
      loadAverage: { before: loadBefore, after: loadavg() },
      results: layouts.map((layersPerGraph, i) => ({
        layersPerGraph,
        wallMsPerToken: stats(wallMs[i]!),
        cpuMsPerToken: stats(cpuMs[i]!),
      })),
    },
    null,
    2,
  ),
)
