import onnxProto from 'onnx-proto'
import { describe, expect, it } from 'vitest'
import {
  analyzeGraph,
  cutModel,
  decodeModel,
  externalDataLocations,
  listCandidates,
  type Observation,
  toExternalData,
} from '../../../splitter/index.ts'
import { bytesOf, functionModel, ifModel, inputSkipModel, residualModel } from './onnx-fixtures.ts'

const { onnx } = onnxProto

/** Every tensor of the fixtures is f32 [2, 4] in a run at batch 2 (the If's sum and cond are scalars). */
function observation(names: readonly string[]): Observation {
  const tensors = new Map(names.map((n) => [n, { type: 'float32' as const, dims: [2, 4] }]))
  tensors.set('sum', { type: 'float32', dims: [] })
  tensors.set('cond', { type: 'bool' as never, dims: [] })
  return { batch: 2, tensors }
}

const RESIDUAL_TENSORS = ['x', 'r', 's', 'b', 'c', 'd', 'y']

function graphOf(bytes: Uint8Array) {
  return decodeModel(bytes).graph!
}

describe('analyzeGraph', () => {
  it('orders compute nodes topologically and sets Constant nodes and initializers apart', () => {
    const a = analyzeGraph(residualModel())
    expect(a.nodes.map((n) => n.label)).toEqual(['r', 's', 'b', 'c', 'd', 'y'])
    expect(a.constantNodes.map((n) => n.opType)).toEqual(['Constant'])
    expect([...a.constants].sort()).toEqual(['W', 'two'])
    expect(a.inputs).toEqual(['x'])
    expect(a.outputs).toEqual(['y'])
  })

  it('sorts a graph whose file order is not topological', () => {
    const m = residualModel()
    m.graph!.node = [...m.graph!.node!].reverse()
    expect(analyzeGraph(m).nodes.map((n) => n.label)).toEqual(['r', 's', 'b', 'c', 'd', 'y'])
  })

  it('counts the outer-scope reads of an If node as its inputs', () => {
    const a = analyzeGraph(ifModel())
    const theIf = a.nodes.find((n) => n.proto.opType === 'If')!
    expect([...theIf.reads].sort()).toEqual(['a', 'cond', 'one'])
    expect(a.innerTensors.get('then_out')).toMatchObject({ kind: 'subgraph', owner: 'the_if', opType: 'If' })
  })
})

describe('listCandidates', () => {
  it('lists every cut in topological order with the tensors crossing it, from a real run', () => {
    const a = analyzeGraph(residualModel())
    const c = listCandidates(a, observation(RESIDUAL_TENSORS))
    expect(c.map((k) => k.kind)).toEqual(['offload', 'cut', 'cut', 'cut', 'cut', 'cut', 'local'])
    expect(c.map((k) => k.crossing)).toEqual([['x'], ['r'], ['r', 's'], ['r', 'b'], ['c'], ['d'], ['y']])
    expect(c.map((k) => k.bytes)).toEqual([32, 32, 64, 64, 32, 32, 32])
    expect(c[3]!.bytesPerItem).toBe(32)
    expect(c[3]!.after).toBe('b')
  })

  it('keeps a graph output computed before the cut crossing until the end', () => {
    const c = listCandidates(analyzeGraph(residualModel({ midOutput: true })), observation(RESIDUAL_TENSORS))
    expect(c.map((k) => k.crossing)).toEqual([['x'], ['r'], ['r', 's'], ['r', 'b'], ['b', 'c'], ['b', 'd'], ['b', 'y']])
  })

  it('keeps the graph input crossing while a later node reads it', () => {
    const c = listCandidates(analyzeGraph(inputSkipModel()), observation(['x', 'a', 'y']))
    expect(c.map((k) => k.crossing)).toEqual([['x'], ['x', 'a'], ['y']])
  })

  it('names a tensor missing from the observation', () => {
    expect(() => listCandidates(analyzeGraph(residualModel()), observation(['x', 'r']))).toThrow(/tensor s: it was not observed/)
  })
})

describe('cutModel', () => {
  const obs = observation(RESIDUAL_TENSORS)

  it('cuts inside the residual block: two crossing tensors, dynamic batch kept, no head node in the tail', () => {
    const a = analyzeGraph(residualModel())
    const cut = cutModel(a, ['r', 'b'], { observation: obs })
    expect(cut.crossing).toEqual([
      { name: 'r', type: 'float32', dims: ['N', null] },
      { name: 'b', type: 'float32', dims: ['N', null] },
    ])
    const head = graphOf(cut.head)
    const tail = graphOf(cut.tail)
    const compute = (g: typeof head) => g.node!.filter((n) => n.opType !== 'Constant').map((n) => n.name)
    expect(compute(head)).toEqual(['r', 's', 'b'])
    expect(compute(tail)).toEqual(['c', 'd', 'y'])
    expect(head.input!.map((v) => v.name)).toEqual(['x'])
    expect(head.output!.map((v) => v.name)).toEqual(['r', 'b'])
    expect(tail.input!.map((v) => v.name)).toEqual(['r', 'b'])
    expect(tail.output!.map((v) => v.name)).toEqual(['y'])
    expect(tail.input![0]!.type!.tensorType!.shape!.dim![0]!.dimParam).toBe('N')
    expect(cut.headNodes + cut.tailNodes).toBe(a.nodes.length)
  })

  it('copies the shared initializer and the shared Constant to both sides', () => {
    const cut = cutModel(analyzeGraph(residualModel()), ['r', 'b'], { observation: obs })
    for (const side of [cut.head, cut.tail]) {
      const g = graphOf(side)
      expect(g.initializer!.map((t) => t.name)).toEqual(['W'])
      expect(g.node!.filter((n) => n.opType === 'Constant').map((n) => n.output![0])).toEqual(['two'])
    }
    // the offload cut's head needs neither
    const offload = graphOf(cutModel(analyzeGraph(residualModel()), ['x'], { observation: obs }).head)
    expect(offload.initializer).toEqual([])
    expect(offload.node).toEqual([])
  })

  it('keeps IR version, opsets and producer on both sides', () => {
    const cut = cutModel(analyzeGraph(residualModel()), ['c'], { observation: obs })
    for (const side of [cut.head, cut.tail]) {
      const m = decodeModel(side)
      expect(Number(m.irVersion)).toBe(8)
      expect(m.opsetImport!.map((o) => [o.domain, Number(o.version)])).toEqual([['', 13]])
      expect(m.producerName).toBe('edgeshard-test')
    }
  })

  it('ignores an initializer named in the cut: it is copied, not sent', () => {
    const cut = cutModel(analyzeGraph(residualModel()), ['W', 'c', 'two'], { observation: obs })
    expect(cut.crossing.map((t) => t.name)).toEqual(['c'])
  })

  it('passes a graph output that is a cut tensor through the tail', () => {
    const cut = cutModel(analyzeGraph(residualModel({ midOutput: true })), ['b', 'c'], { observation: obs })
    const tail = graphOf(cut.tail)
    expect(tail.input!.map((v) => v.name)).toEqual(['b', 'c'])
    expect(tail.output!.map((v) => v.name)).toEqual(['y', 'b'])
    expect(cut.outputs).toEqual(['y', 'b'])
  })

  it('takes types from value_info when the model declares them (no run needed)', () => {
    const m = residualModel()
    m.graph!.valueInfo = [onnx.ValueInfoProto.create({ name: 'c', type: { tensorType: { elemType: 1, shape: { dim: [{ dimParam: 'N' }, { dimValue: 4 }] } } } })]
    const cut = cutModel(analyzeGraph(m), ['c'])
    expect(cut.crossing).toEqual([{ name: 'c', type: 'float32', dims: ['N', 4] }])
    expect(() => cutModel(analyzeGraph(residualModel()), ['c'])).toThrow(expect.objectContaining({ name: 'CutError', message: expect.stringMatching(/declares no type for it/) }))
  })

  it('refuses a cut through an If branch with ControlFlowCutError, and cuts around the If', () => {
    const a = analyzeGraph(ifModel())
    expect(() => cutModel(a, ['then_out'])).toThrow(expect.objectContaining({ name: 'ControlFlowCutError', node: 'the_if' }))
    expect(() => cutModel(a, ['then_out'])).toThrow(/inside a subgraph of If node the_if/)
    const ifObs = observation(['x', 'a', 't', 'y'])
    const before = cutModel(a, ['a', 'cond'], { observation: ifObs })
    expect(graphOf(before.tail).node!.map((n) => n.opType)).toEqual(['If', 'Mul'])
    // a cut at `cond` alone: the tail would have to compute `a` (read inside the If's branches) from the graph input
    expect(() => cutModel(a, ['cond'], { observation: ifObs })).toThrow(expect.objectContaining({ name: 'CutError', message: expect.stringMatching(/node a \(Relu\) needs graph input x/) }))
    // a cut at `a` and `sum`: the Greater runs in the tail, and the If's implicit read of `a` is satisfied
    expect(graphOf(cutModel(a, ['a', 'sum'], { observation: ifObs }).tail).node!.map((n) => n.opType)).toEqual(['Greater', 'If', 'Mul'])
  })

  it('refuses a cut inside a model-local function with LocalFunctionCutError, and keeps the function otherwise', () => {
    const a = analyzeGraph(functionModel())
    expect(() => cutModel(a, ['t'])).toThrow(expect.objectContaining({ name: 'LocalFunctionCutError', fn: 'custom:Twice' }))
    const cut = cutModel(a, ['a'], { observation: observation(['x', 'a', 'y']) })
    const tail = decodeModel(cut.tail)
    expect(tail.functions!.map((f) => f.name)).toEqual(['Twice'])
    expect(tail.opsetImport!.map((o) => o.domain)).toEqual(['', 'custom'])
  })

  it('names an unknown tensor, a tail that needs the graph input, and a node that would run twice', () => {
    const res = analyzeGraph(residualModel())
    expect(() => cutModel(res, ['nope'])).toThrow(expect.objectContaining({ name: 'CutError', message: 'cannot cut at tensor nope: the model\'s graph has no tensor of that name' }))
    expect(() => cutModel(analyzeGraph(inputSkipModel()), ['a'], { observation: observation(['x', 'a']) })).toThrow(
      /the tail's node y \(Add\) needs graph input x, which only the head gets/,
    )
    // at s alone, the tail's residual Add still needs r, which the head computes
    expect(() => cutModel(res, ['s'], { observation: obs })).toThrow(/the tail's node c \(Add\) needs tensor r, which the head computes/)
    expect(() => cutModel(res, [])).toThrow(/no compute tensor to cut at/)
  })

  it('keeps external-data references on both sides', () => {
    const m = residualModel()
    const { model, data } = toExternalData(m, 'weights.bin', 16)
    expect(data.byteLength).toBe(64)
    const decoded = decodeModel(model)
    expect(externalDataLocations(decoded)).toEqual(['weights.bin'])
    const cut = cutModel(analyzeGraph(decoded), ['r', 'b'], { observation: obs })
    expect(externalDataLocations(decodeModel(cut.head))).toEqual(['weights.bin'])
    expect(externalDataLocations(decodeModel(cut.tail))).toEqual(['weights.bin'])
    expect(cut.headBytes).toBe(cut.head.byteLength + 64)
    expect(bytesOf(decoded).byteLength).toBeLessThan(bytesOf(m).byteLength)
  })
})
