/**
 * Candidate cuts of a model in topological order, with the tensors and bytes crossing each (Neurosurgeon, Kang et
 * al. 2017, §4: every layer boundary is a partition point; BottleFit §3 adds the bottleneck). Candidate `k` runs the
 * first `k` compute nodes on the device: `k = 0` sends the graph inputs (full offload), `k = n` runs everything locally.
 *
 * The bytes come from a real run (an {@link Observation}), not from value_info, which models often omit.
 */
import onnxProto from 'onnx-proto'
import { CutError } from './errors.ts'
import type { GraphAnalysis } from './onnx-graph.ts'
import { encodeModel, withGraph } from './onnx-graph.ts'
import { type Observation, tensorByteLength } from './tensor-types.ts'

const { onnx } = onnxProto

/** One place to cut: after compute node `index − 1` in topological order. */
export interface CutCandidate {
  /** Compute nodes on the head side (0 … nodes.length). */
  readonly index: number
  /** 'offload' (index 0: send the inputs), 'local' (index n: nothing left for a server), else 'cut'. */
  readonly kind: 'offload' | 'cut' | 'local'
  /** Label and op of the last head node, or null for offload. */
  readonly after: string | null
  readonly afterOp: string | null
  /** Tensors crossing the cut (inputs first, then in the order they are computed). */
  readonly crossing: readonly string[]
  /** Bytes of the crossing tensors in the observed run, at its batch size. */
  readonly bytes: number
  /** `bytes` divided by the observed batch size. */
  readonly bytesPerItem: number
}

/**
 * Lists every candidate cut of the analysed model (`nodes.length + 1` of them) with crossing tensors and bytes.
 * @throws CutError when a crossing tensor is missing from the observation
 */
export function listCandidates(analysis: GraphAnalysis, observation: Observation): CutCandidate[] {
  const n = analysis.nodes.length
  const outputs = new Set(analysis.outputs)
  const lastUse = new Map<string, number>()
  for (const node of analysis.nodes) for (const r of node.reads) lastUse.set(r, node.index)
  const bytesOf = (name: string): number => {
    const t = observation.tensors.get(name)
    if (!t) throw new CutError(`cannot size the cut at tensor ${name}: it was not observed in the profiling run`)
    return tensorByteLength(t.type, t.dims)
  }
  const live: string[] = analysis.inputs.filter((i) => lastUse.has(i) || outputs.has(i))
  const candidates: CutCandidate[] = []
  for (let k = 0; k <= n; k++) {
    const crossing = live.filter((t) => (lastUse.get(t) ?? -1) >= k || outputs.has(t))
    const bytes = crossing.reduce((sum, t) => sum + bytesOf(t), 0)
    const last = k > 0 ? analysis.nodes[k - 1]! : undefined
    candidates.push({
      index: k,
      kind: k === 0 ? 'offload' : k === n ? 'local' : 'cut',
      after: last?.label ?? null,
      afterOp: last?.proto.opType ?? null,
      crossing,
      bytes,
      bytesPerItem: bytes / observation.batch,
    })
    // keep only what may still cross, then add node k's outputs
    if (k < n) {
      const kept = live.filter((t) => (lastUse.get(t) ?? -1) > k || outputs.has(t))
      live.length = 0
      live.push(...kept, ...analysis.nodes[k]!.writes.filter((w) => lastUse.has(w) || outputs.has(w)))
    }
  }
  return candidates
}

/**
 * The model with every compute tensor of its main graph (and every graph input is fed anyway) added as a graph
 * output, so one run shows the type, shape and bytes of each (outputs are declared untyped: onnxruntime infers them).
 * @returns ONNX bytes and the names of the tensors exposed (graph outputs first)
 */
export function exposeAllTensors(analysis: GraphAnalysis): { model: Uint8Array; tensors: string[] } {
  const model = analysis.model
  const graph = model.graph!
  const existing = new Set(analysis.outputs)
  const extra: string[] = []
  for (const node of analysis.nodes) for (const w of node.writes) if (!existing.has(w)) extra.push(w)
  const out = withGraph(
    model,
    onnx.GraphProto.create({
      ...graph,
      output: [...(graph.output ?? []), ...extra.map((name) => onnx.ValueInfoProto.create({ name }))],
    }),
  )
  return { model: encodeModel(out), tensors: [...analysis.outputs, ...extra] }
}
