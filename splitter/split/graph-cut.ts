/**
 * Cutting an ONNX model into a head (graph inputs → the cut tensors) and a tail (the cut tensors → graph outputs), as
 * in split computing (Matsubara et al., "BottleFit", 2022, §3: the head runs on the device, the tail on the server).
 *
 * - The tensors crossing the cut become head outputs and tail inputs, with their element type and shape from the
 *   model's declarations, else from a real run ({@link Observation}); a dynamic batch dimension stays symbolic.
 * - Initializers and constant nodes are copied to every side that reads them; compute nodes run on exactly one side.
 * - Opset imports, IR version, model-local functions and external-data references are kept as they are, so a model
 *   with external data cuts into head and tail that load with the same external files.
 * - A graph output computed before the cut must be in the cut; the tail then passes it through.
 */
import onnxProto from 'onnx-proto'
import { ControlFlowCutError, CutError, LocalFunctionCutError } from './errors.ts'
import type { GraphAnalysis, GraphNode, OnnxModel, OnnxNode, OnnxValueInfo } from './onnx-graph.ts'
import { encodeModel, withGraph } from './onnx-graph.ts'
import { type ElementType, elementTypeOfCode, type Observation, ONNX_TYPE_CODE } from './tensor-types.ts'

const { onnx } = onnxProto

/** A dimension of a crossing tensor: a size, a symbolic name (e.g. the batch `'N'`), or `null` for unknown. */
export type CutDim = number | string | null

/** A tensor crossing the cut: a head output and a tail input. */
export interface CrossingTensor {
  readonly name: string
  readonly type: ElementType
  readonly dims: readonly CutDim[]
}

/** A model cut in two: serialised head and tail plus what crosses between them. */
export interface ModelCut {
  /** ONNX bytes of the head: graph inputs `headInputs` → outputs `crossing` (in that order). */
  readonly head: Uint8Array
  /** ONNX bytes of the tail: inputs `crossing` → the model's graph outputs. */
  readonly tail: Uint8Array
  readonly crossing: readonly CrossingTensor[]
  /** Graph inputs the head reads (a subset of the model's inputs, declaration order). */
  readonly headInputs: readonly string[]
  /** The model's graph outputs, which the tail produces. */
  readonly outputs: readonly string[]
  /** Compute nodes on each side (constants not counted). */
  readonly headNodes: number
  readonly tailNodes: number
  /** Bytes the device holds to run the head: its ONNX bytes plus the external data its initializers reference. */
  readonly headBytes: number
}

/** Options of {@link cutModel}. */
export interface CutOptions {
  /** Types and shapes from a real run, for crossing tensors the model declares no type for. */
  readonly observation?: Observation
}

function dimsOf(info: OnnxValueInfo): CutDim[] | undefined {
  const shape = info.type?.tensorType?.shape
  if (!shape) return undefined
  return (shape.dim ?? []).map((d) => (d.dimParam ? d.dimParam : d.dimValue !== undefined && d.dimValue !== null ? Number(d.dimValue) : null))
}

/** The symbolic batch dimension of the model (dimension 0 of its first input), or undefined when fixed. */
function batchParam(analysis: GraphAnalysis): string | undefined {
  const first = analysis.inputs[0]
  const info = first === undefined ? undefined : analysis.declared.get(first)
  const d0 = info?.type?.tensorType?.shape?.dim?.[0]
  return d0?.dimParam ? d0.dimParam : undefined
}

function allInputsStatic(analysis: GraphAnalysis): boolean {
  return analysis.inputs.every((name) => {
    const info = analysis.declared.get(name)
    const dims = info ? dimsOf(info) : undefined
    return dims?.every((d) => typeof d === 'number') ?? false
  })
}

/**
 * Type and shape of tensor `name` at a cut: declared (graph input/output, value_info) when available, else observed
 * in a real run, where dimension 0 becomes the model's symbolic batch dimension when it equals the observed batch and
 * other dimensions stay unknown unless every model input is static.
 * @throws CutError when neither the model nor the observation gives the type
 */
export function crossingTensor(analysis: GraphAnalysis, name: string, observation?: Observation): CrossingTensor {
  const declared = analysis.declared.get(name)
  const observed = observation?.tensors.get(name)
  const code = declared?.type?.tensorType?.elemType
  const declaredType = code === undefined || code === null ? undefined : elementTypeOfCode(code)
  if (declared && declaredType) {
    const dims = dimsOf(declared)
    if (dims) return { name, type: declaredType, dims }
  }
  if (observed) {
    const batch = batchParam(analysis)
    const exact = allInputsStatic(analysis)
    const dims = observed.dims.map((d, i): CutDim => {
      if (exact) return d
      if (i === 0 && batch !== undefined && d === observation?.batch) return batch
      return null
    })
    return { name, type: declaredType ?? observed.type, dims }
  }
  if (declared && code !== undefined && code !== null && !declaredType) {
    throw new CutError(`cannot cut at tensor ${name}: its element type (ONNX code ${code}) cannot cross a cut`)
  }
  throw new CutError(`cannot cut at tensor ${name}: the model declares no type for it and no observed run was given (pass an observation from a real run)`)
}

function valueInfoOf(t: CrossingTensor): OnnxValueInfo {
  return onnx.ValueInfoProto.create({
    name: t.name,
    type: {
      tensorType: {
        elemType: ONNX_TYPE_CODE[t.type],
        shape: { dim: t.dims.map((d) => (typeof d === 'number' ? { dimValue: d } : typeof d === 'string' ? { dimParam: d } : {})) },
      },
    },
  })
}

/** The set of compute nodes needed to produce `targets`, stopping at `stops`; graph inputs reached are reported. */
function ancestors(
  analysis: GraphAnalysis,
  targets: readonly string[],
  stops: ReadonlySet<string>,
  onInput: (input: string, needer: string) => void,
  onNode: (node: GraphNode, tensor: string, needer: string) => void = () => {},
): { nodes: Set<GraphNode>; constants: Set<string> } {
  const nodes = new Set<GraphNode>()
  const constants = new Set<string>()
  const seen = new Set<string>()
  const stack = targets.map((t) => ({ tensor: t, needer: 'graph output' }))
  while (stack.length > 0) {
    const { tensor, needer } = stack.pop()!
    if (seen.has(tensor)) continue
    seen.add(tensor)
    if (stops.has(tensor)) continue
    if (analysis.constants.has(tensor)) {
      constants.add(tensor)
      continue
    }
    const node = analysis.producer.get(tensor)
    if (!node) {
      onInput(tensor, needer)
      continue
    }
    if (nodes.has(node)) continue
    onNode(node, tensor, needer)
    nodes.add(node)
    for (const r of node.reads) stack.push({ tensor: r, needer: `node ${node.label} (${node.proto.opType})` })
  }
  return { nodes, constants }
}

/** Constant nodes and initializers needed for `constants` (constant nodes may read other constants). */
function constantClosure(analysis: GraphAnalysis, constants: ReadonlySet<string>): { nodes: Set<OnnxNode>; initializers: Set<string> } {
  const nodes = new Set<OnnxNode>()
  const initializers = new Set<string>()
  const stack = [...constants]
  const seen = new Set<string>()
  while (stack.length > 0) {
    const name = stack.pop()!
    if (seen.has(name)) continue
    seen.add(name)
    if (analysis.initializers.has(name)) {
      initializers.add(name)
      continue
    }
    const node = analysis.constantProducer.get(name)
    if (!node || nodes.has(node)) continue
    nodes.add(node)
    for (const i of node.input ?? []) if (i) stack.push(i)
  }
  return { nodes, initializers }
}

function buildModel(
  analysis: GraphAnalysis,
  side: 'head' | 'tail',
  compute: ReadonlySet<GraphNode>,
  constants: ReadonlySet<string>,
  inputs: OnnxValueInfo[],
  outputs: OnnxValueInfo[],
): { bytes: Uint8Array; externalBytes: number } {
  const model: OnnxModel = analysis.model
  const graph = model.graph!
  const { nodes: constNodes, initializers } = constantClosure(analysis, constants)
  const ordered = [...analysis.constantNodes.filter((n) => constNodes.has(n)), ...analysis.nodes.filter((n) => compute.has(n)).map((n) => n.proto)]
  const written = new Set<string>()
  for (const n of ordered) for (const o of n.output ?? []) if (o) written.add(o)
  const boundary = new Set([...inputs, ...outputs].map((v) => v.name ?? ''))
  const kept = (graph.initializer ?? []).filter((t) => initializers.has(t.name ?? ''))
  const externalBytes = kept
    .filter((t) => t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL)
    .reduce((sum, t) => sum + Number((t.externalData ?? []).find((e) => e.key === 'length')?.value ?? 0), 0)
  const sub = onnx.GraphProto.create({
    name: `${graph.name ?? 'graph'}_${side}`,
    node: ordered,
    initializer: kept,
    sparseInitializer: (graph.sparseInitializer ?? []).filter((s) => initializers.has(s.values?.name ?? '')),
    input: inputs,
    output: outputs,
    valueInfo: (graph.valueInfo ?? []).filter((v) => written.has(v.name ?? '') && !boundary.has(v.name ?? '')),
    quantizationAnnotation: (graph.quantizationAnnotation ?? []).filter((a) => written.has(a.tensorName ?? '') || initializers.has(a.tensorName ?? '')),
    ...(graph.docString ? { docString: graph.docString } : {}),
  })
  const out = withGraph(model, sub)
  return { bytes: encodeModel(out), externalBytes }
}

/**
 * Checks that every name in `cut` is a tensor of the main graph and returns the ones that cross (constants dropped,
 * duplicates removed, order kept).
 * @throws ControlFlowCutError / LocalFunctionCutError for a tensor inside an If/Loop/Scan body or a local function;
 *   CutError for a name the graph does not define
 */
function crossingNames(analysis: GraphAnalysis, cut: readonly string[]): string[] {
  const names: string[] = []
  for (const name of cut) {
    if (names.includes(name) || analysis.constants.has(name)) continue
    const inner = analysis.innerTensors.get(name)
    if (inner?.kind === 'subgraph') {
      throw new ControlFlowCutError(
        inner.owner,
        `cannot cut at tensor ${name}: it lives inside a subgraph of ${inner.opType} node ${inner.owner} (control flow is never cut through); cut before or after that node`,
      )
    }
    if (inner?.kind === 'function') {
      throw new LocalFunctionCutError(
        inner.owner,
        `cannot cut at tensor ${name}: it lives inside the model-local function ${inner.owner} (functions are never cut through); cut before or after the call`,
      )
    }
    if (!analysis.producer.has(name) && !analysis.inputs.includes(name)) {
      throw new CutError(`cannot cut at tensor ${name}: the model's graph has no tensor of that name`)
    }
    names.push(name)
  }
  if (names.length === 0) throw new CutError(`cannot cut at [${cut.join(', ')}]: no compute tensor to cut at (empty cut, or only constants)`)
  return names
}

/**
 * Cuts the analysed model at the tensors `cut`: the head computes them from the graph inputs, the tail computes the
 * graph outputs from them alone.
 *
 * @param cut - tensor names of the main graph; constants among them are ignored (they are copied, not sent)
 * @throws ControlFlowCutError / LocalFunctionCutError for a tensor inside a control-flow body or local function;
 *   CutError when a name is unknown, the tail would need a graph input or head tensor not in the cut, a node would
 *   run on both sides, or a crossing tensor's type is unknown
 */
export function cutModel(analysis: GraphAnalysis, cut: readonly string[], options: CutOptions = {}): ModelCut {
  const names = crossingNames(analysis, cut)
  const stops = new Set(names)
  const headInputs = new Set<string>()
  const head = ancestors(analysis, names, new Set(), (input) => headInputs.add(input))
  const tail = ancestors(
    analysis,
    analysis.outputs,
    stops,
    (input, needer) => {
      throw new CutError(`cannot cut at [${names.join(', ')}]: the tail's ${needer} needs graph input ${input}, which only the head gets; add it to the cut`)
    },
    (node, tensor, needer) => {
      if (head.nodes.has(node)) {
        throw new CutError(`cannot cut at [${names.join(', ')}]: the tail's ${needer} needs tensor ${tensor}, which the head computes; add it to the cut`)
      }
    },
  )
  for (const node of tail.nodes) {
    if (head.nodes.has(node)) {
      throw new CutError(
        `cannot cut at [${names.join(', ')}]: node ${node.label} (${node.proto.opType}) would run on both sides; add its output ${node.writes.join(', ')} to the cut`,
      )
    }
  }
  const crossing = names.map((n) => crossingTensor(analysis, n, options.observation))
  const graph = analysis.model.graph!
  const declaredInputs = (graph.input ?? []).filter((v) => headInputs.has(v.name ?? ''))
  const crossingInfo = crossing.map(valueInfoOf)
  const headModel = buildModel(analysis, 'head', head.nodes, head.constants, declaredInputs, crossingInfo)
  const tailModel = buildModel(analysis, 'tail', tail.nodes, tail.constants, crossingInfo, [...(graph.output ?? [])])
  return {
    head: headModel.bytes,
    tail: tailModel.bytes,
    crossing,
    headInputs: declaredInputs.map((v) => v.name ?? ''),
    outputs: analysis.outputs,
    headNodes: head.nodes.size,
    tailNodes: tail.nodes.size,
    headBytes: headModel.bytes.byteLength + headModel.externalBytes,
  }
}
