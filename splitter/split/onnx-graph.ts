/**
 * Dependency analysis of an ONNX model's main graph for cutting (ONNX IR spec: "Graphs", "Names Within a Graph",
 * "Nodes" — graphs are topologically sorted, names are SSA; subgraphs of control-flow nodes may read outer-scope
 * tensors by name without listing them as node inputs).
 *
 * A node is *constant* when it reads only initializers and other constants (a `Constant` node, or e.g. a `Cast` of an
 * initializer), is deterministic and has no subgraph: constants are copied to every side that uses them and never
 * cross a cut. Every other node is a *compute* node and runs on exactly one side.
 */
import onnxProto from 'onnx-proto'
import { ModelFormatError } from '../errors.ts'
import { CutError } from './errors.ts'

const { onnx } = onnxProto

/** A decoded ONNX model (onnx-proto `ModelProto`). */
export type OnnxModel = InstanceType<typeof onnx.ModelProto>
/** A node of an ONNX graph (onnx-proto `INodeProto`). */
export type OnnxNode = onnxProto.onnx.INodeProto
/** A graph of an ONNX model (onnx-proto `IGraphProto`). */
export type OnnxGraph = onnxProto.onnx.IGraphProto
/** A typed name of an ONNX graph (onnx-proto `IValueInfoProto`). */
export type OnnxValueInfo = onnxProto.onnx.IValueInfoProto

/** Operators whose output changes from run to run: never treated as constants even without inputs. */
const NONDETERMINISTIC_OPS = new Set(['RandomNormal', 'RandomUniform', 'RandomNormalLike', 'RandomUniformLike', 'Multinomial', 'Bernoulli'])

/** A compute node of the main graph with its position in topological order. */
export interface GraphNode {
  /** Position among the compute nodes in topological order (0-based). */
  readonly index: number
  readonly proto: OnnxNode
  /** `name` of the node, or `opType#index` when unnamed. */
  readonly label: string
  /** Tensors it reads: its non-empty inputs plus the outer-scope tensors its subgraphs read. */
  readonly reads: readonly string[]
  /** Tensors it writes (non-empty outputs). */
  readonly writes: readonly string[]
  /** True when the node carries subgraphs (If, Loop, Scan, …). */
  readonly hasSubgraphs: boolean
}

/** Where a tensor that only exists inside a subgraph or function lives (for cut errors). */
export interface InnerTensorSite {
  readonly kind: 'subgraph' | 'function'
  /** The control-flow node label and its op (`subgraph`) or `domain:name` of the function (`function`). */
  readonly owner: string
  readonly opType: string
}

/** The analysis {@link analyzeGraph} returns. */
export interface GraphAnalysis {
  readonly model: OnnxModel
  /** Compute nodes in topological order (the file's order when it is already topological). */
  readonly nodes: readonly GraphNode[]
  /** Constant nodes in topological order. */
  readonly constantNodes: readonly OnnxNode[]
  /** Graph inputs that are not initializers, in declaration order. */
  readonly inputs: readonly string[]
  /** Graph outputs in declaration order. */
  readonly outputs: readonly string[]
  /** Compute node writing each tensor. */
  readonly producer: ReadonlyMap<string, GraphNode>
  /** Constant node writing each constant tensor (initializers are not listed). */
  readonly constantProducer: ReadonlyMap<string, OnnxNode>
  /** Initializer names. */
  readonly initializers: ReadonlySet<string>
  /** Every constant tensor: initializers and outputs of constant nodes. */
  readonly constants: ReadonlySet<string>
  /** Declared type of each tensor that has one (graph inputs, outputs, value_info). */
  readonly declared: ReadonlyMap<string, OnnxValueInfo>
  /** Compute nodes reading each tensor, in topological order. */
  readonly consumers: ReadonlyMap<string, readonly GraphNode[]>
  /** Tensors that exist only inside a control-flow subgraph or a model-local function body. */
  readonly innerTensors: ReadonlyMap<string, InnerTensorSite>
}

function nodeLabel(node: OnnxNode, position: number): string {
  return node.name ? node.name : `${node.opType ?? '?'}#${position}`
}

function subgraphsOf(node: OnnxNode): OnnxGraph[] {
  const graphs: OnnxGraph[] = []
  for (const attr of node.attribute ?? []) {
    if (attr.g) graphs.push(attr.g)
    for (const g of attr.graphs ?? []) graphs.push(g)
  }
  return graphs
}

/**
 * Names a subgraph reads from its enclosing scopes: every name used by its nodes (recursively) that it does not
 * define itself (ONNX IR: outer-scope references).
 */
function outerReads(graph: OnnxGraph, out: Set<string>, definedOuter: ReadonlySet<string> = new Set()): void {
  const defined = new Set(definedOuter)
  for (const v of graph.input ?? []) if (v.name) defined.add(v.name)
  for (const t of graph.initializer ?? []) if (t.name) defined.add(t.name)
  for (const s of graph.sparseInitializer ?? []) if (s.values?.name) defined.add(s.values.name)
  for (const n of graph.node ?? []) for (const o of n.output ?? []) if (o) defined.add(o)
  for (const n of graph.node ?? []) {
    for (const i of n.input ?? []) if (i && !defined.has(i)) out.add(i)
    for (const g of subgraphsOf(n)) {
      const inner = new Set<string>()
      outerReads(g, inner, defined)
      for (const name of inner) if (!defined.has(name)) out.add(name)
    }
  }
}

/** Records every tensor written inside `graph` (recursively) as living in `site`. */
function collectInner(graph: OnnxGraph, site: InnerTensorSite, into: Map<string, InnerTensorSite>): void {
  for (const v of graph.input ?? []) if (v.name && !into.has(v.name)) into.set(v.name, site)
  for (const n of graph.node ?? []) {
    for (const o of n.output ?? []) if (o && !into.has(o)) into.set(o, site)
    for (const g of subgraphsOf(n)) collectInner(g, site, into)
  }
}

/**
 * Decodes ONNX protobuf bytes with onnx-proto (the ONNX schema of IR 8). Fields added after IR 8 (IR 9/10: function
 * attribute defaults and value_info, overloads, metadata of graphs and nodes) are not in that schema and are dropped
 * when a cut is written back.
 * @throws ModelFormatError naming `label` when the bytes are not an ONNX model with a graph
 */
export function decodeModel(bytes: Uint8Array, label = 'model'): OnnxModel {
  let model: OnnxModel
  try {
    model = onnx.ModelProto.decode(bytes)
  } catch (err) {
    throw new ModelFormatError(label, `not an ONNX model: ${(err as Error).message}`, { cause: err })
  }
  if (!model.graph || (model.graph.node ?? []).length === 0 && (model.graph.output ?? []).length === 0) {
    throw new ModelFormatError(label, 'ONNX model has no graph (no nodes and no outputs)')
  }
  return model
}

/** Serialises a model to ONNX protobuf bytes. */
export function encodeModel(model: OnnxModel): Uint8Array {
  return onnx.ModelProto.encode(model).finish()
}

/** A copy of `model` (IR version, opsets, producer, metadata, functions kept) with `graph` as its main graph. */
export function withGraph(model: OnnxModel, graph: onnxProto.onnx.IGraphProto): OnnxModel {
  return onnx.ModelProto.create({
    irVersion: model.irVersion,
    opsetImport: model.opsetImport,
    producerName: model.producerName,
    producerVersion: model.producerVersion,
    domain: model.domain,
    modelVersion: model.modelVersion,
    docString: model.docString,
    metadataProps: model.metadataProps,
    functions: model.functions,
    graph,
  })
}

/**
 * Analyses the main graph of `model` for cutting: topological order, constants, producers and consumers (including
 * outer-scope reads of subgraphs), declared types, and the tensors that live only inside subgraphs or functions.
 *
 * @throws CutError when a node reads a tensor nothing defines, or the graph has a cycle
 */
export function analyzeGraph(model: OnnxModel): GraphAnalysis {
  const graph = model.graph ?? {}
  const protoNodes = graph.node ?? []
  const initializers = new Set<string>()
  for (const t of graph.initializer ?? []) if (t.name) initializers.add(t.name)
  for (const s of graph.sparseInitializer ?? []) if (s.values?.name) initializers.add(s.values.name)
  const inputs = (graph.input ?? []).map((v) => v.name ?? '').filter((n) => n && !initializers.has(n))
  const outputs = (graph.output ?? []).map((v) => v.name ?? '').filter((n) => n)
  const declared = new Map<string, OnnxValueInfo>()
  for (const v of [...(graph.valueInfo ?? []), ...(graph.input ?? []), ...(graph.output ?? [])]) {
    if (v.name && v.type?.tensorType) declared.set(v.name, v)
  }

  // What each node reads, including outer-scope reads of its subgraphs.
  const reads = protoNodes.map((node) => {
    const names = new Set((node.input ?? []).filter((i) => i))
    for (const g of subgraphsOf(node)) outerReads(g, names)
    return [...names]
  })

  // Stable topological order: the file order when valid (one pass), else repeated passes in file order.
  const available = new Set<string>([...inputs, ...initializers])
  const order: number[] = []
  const done = new Array<boolean>(protoNodes.length).fill(false)
  let remaining = protoNodes.length
  while (remaining > 0) {
    let progressed = false
    for (let i = 0; i < protoNodes.length; i++) {
      if (done[i] || !reads[i]!.every((r) => available.has(r))) continue
      done[i] = true
      remaining--
      progressed = true
      order.push(i)
      for (const o of protoNodes[i]!.output ?? []) if (o) available.add(o)
    }
    if (!progressed) {
      const stuck = protoNodes.findIndex((_, i) => !done[i])
      const node = protoNodes[stuck]!
      const missing = reads[stuck]!.filter((r) => !available.has(r))
      throw new CutError(
        `cannot analyse graph: node ${nodeLabel(node, stuck)} (${node.opType}) reads ${missing.join(', ')}, which no node, input or initializer defines (or the graph has a cycle)`,
      )
    }
  }

  const constants = new Set(initializers)
  const constantProducer = new Map<string, OnnxNode>()
  const constantNodes: OnnxNode[] = []
  const nodes: GraphNode[] = []
  const producer = new Map<string, GraphNode>()
  const consumers = new Map<string, GraphNode[]>()
  for (const i of order) {
    const proto = protoNodes[i]!
    const hasSubgraphs = subgraphsOf(proto).length > 0
    const isConstant =
      !hasSubgraphs && !NONDETERMINISTIC_OPS.has(proto.opType ?? '') && (proto.output ?? []).some((o) => o) && reads[i]!.every((r) => constants.has(r))
    const writes = (proto.output ?? []).filter((o) => o)
    if (isConstant) {
      constantNodes.push(proto)
      for (const o of writes) {
        constants.add(o)
        constantProducer.set(o, proto)
      }
      continue
    }
    const node: GraphNode = { index: nodes.length, proto, label: nodeLabel(proto, i), reads: reads[i]!, writes, hasSubgraphs }
    nodes.push(node)
    for (const o of writes) producer.set(o, node)
    for (const r of node.reads) {
      const list = consumers.get(r)
      if (list) list.push(node)
      else consumers.set(r, [node])
    }
  }

  const innerTensors = new Map<string, InnerTensorSite>()
  for (const node of nodes) {
    for (const g of subgraphsOf(node.proto)) collectInner(g, { kind: 'subgraph', owner: node.label, opType: node.proto.opType ?? '?' }, innerTensors)
  }
  for (const fn of model.functions ?? []) {
    const owner = `${fn.domain ?? ''}:${fn.name ?? ''}`
    const site: InnerTensorSite = { kind: 'function', owner, opType: fn.name ?? '?' }
    for (const n of fn.node ?? []) {
      for (const o of n.output ?? []) if (o && !innerTensors.has(o)) innerTensors.set(o, site)
      for (const g of subgraphsOf(n)) collectInner(g, site, innerTensors)
    }
  }
  // A name defined in the main graph is not "inner", even if a subgraph reuses it.
  for (const name of [...inputs, ...constants, ...producer.keys()]) innerTensors.delete(name)

  return {
    model,
    nodes,
    constantNodes,
    inputs,
    outputs,
    producer,
    constantProducer,
    initializers,
    constants,
    declared,
    consumers,
    innerTensors,
  }
}
