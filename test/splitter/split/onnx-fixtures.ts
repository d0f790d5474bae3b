/**
 * Small ONNX models for cut tests, written with onnx-proto: a residual block with a shared weight and a shared
 * Constant, a variant with an intermediate graph output, an If model whose branches read an outer tensor, a model
 * calling a model-local function, and a model whose tail needs the graph input again.
 */
import onnxProto from 'onnx-proto'

const { onnx } = onnxProto
const FLOAT = onnx.TensorProto.DataType.FLOAT

type Dim = number | string

function vi(name: string, dims: readonly Dim[], elemType: number = FLOAT) {
  return onnx.ValueInfoProto.create({
    name,
    type: { tensorType: { elemType, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) } } },
  })
}

function node(opType: string, input: string[], output: string[], name = output[0]!, extra: Partial<onnxProto.onnx.INodeProto> = {}) {
  return onnx.NodeProto.create({ opType, input, output, name, ...extra })
}

function f32Tensor(name: string, dims: number[], values: number[]) {
  return onnx.TensorProto.create({ name, dataType: FLOAT, dims, rawData: new Uint8Array(Float32Array.from(values).buffer) })
}

function constantNode(output: string, value: number) {
  return onnx.NodeProto.create({
    opType: 'Constant',
    output: [output],
    name: `const_${output}`,
    attribute: [{ name: 'value', type: onnx.AttributeProto.AttributeType.TENSOR, t: f32Tensor('', [], [value]) }],
  })
}

/** 4×4 weight with distinct values. */
export const W_VALUES = Array.from({ length: 16 }, (_, i) => ((i * 7) % 11) / 10 - 0.4)

function model(graph: onnxProto.onnx.IGraphProto, extra: Partial<onnxProto.onnx.IModelProto> = {}) {
  return onnx.ModelProto.create({ irVersion: 8, opsetImport: [{ domain: '', version: 13 }], producerName: 'edgeshard-test', graph, ...extra })
}

/**
 * x [N,4] → r = Relu(x) → s = Mul(r, two) → b = MatMul(s, W) → c = Add(b, r) (residual) → d = Mul(c, two) →
 * y = MatMul(d, W). `two` is a Constant node and `W` an initializer, both read on either side of middle cuts.
 * With `midOutput`, `b` is also a graph output. value_info is left out on purpose (cuts type from a real run).
 */
export function residualModel(options: { midOutput?: boolean } = {}) {
  return model({
    name: 'residual',
    node: [
      constantNode('two', 2),
      node('Relu', ['x'], ['r']),
      node('Mul', ['r', 'two'], ['s']),
      node('MatMul', ['s', 'W'], ['b']),
      node('Add', ['b', 'r'], ['c']),
      node('Mul', ['c', 'two'], ['d']),
      node('MatMul', ['d', 'W'], ['y']),
    ],
    initializer: [f32Tensor('W', [4, 4], W_VALUES)],
    input: [vi('x', ['N', 4])],
    output: [vi('y', ['N', 4]), ...(options.midOutput ? [vi('b', ['N', 4])] : [])],
  })
}

/** x [N,4] → a = Relu(x); y = Add(a, x): the tail of any cut after Relu needs the graph input again. */
export function inputSkipModel() {
  return model({
    name: 'input_skip',
    node: [node('Relu', ['x'], ['a']), node('Add', ['a', 'x'], ['y'])],
    input: [vi('x', ['N', 4])],
    output: [vi('y', ['N', 4])],
  })
}

/**
 * x [N,4] → a = Relu(x); cond = Greater(ReduceSum(x), zero); t = If(cond) { then: a + one } else { a − one } (the
 * branches read the outer tensor `a` by name); y = Mul(t, t).
 */
export function ifModel() {
  const branch = (name: string, op: string) =>
    onnx.GraphProto.create({
      name,
      node: [node(op, ['a', 'one'], [`${name}_out`])],
      output: [vi(`${name}_out`, ['N', 4])],
    })
  return model({
    name: 'if_model',
    node: [
      node('Relu', ['x'], ['a']),
      node('ReduceSum', ['x'], ['sum'], 'sum', { attribute: [{ name: 'keepdims', type: onnx.AttributeProto.AttributeType.INT, i: 0 }] }),
      node('Greater', ['sum', 'zero'], ['cond']),
      node('If', ['cond'], ['t'], 'the_if', {
        attribute: [
          { name: 'then_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch('then', 'Add') },
          { name: 'else_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch('else', 'Sub') },
        ],
      }),
      node('Mul', ['t', 't'], ['y']),
    ],
    initializer: [f32Tensor('zero', [], [0]), f32Tensor('one', [], [1])],
    input: [vi('x', ['N', 4])],
    output: [vi('y', ['N', 4])],
  })
}

/** x [N,4] → a = Relu(x) → y = custom.Twice(a), with Twice(X) = (X + X)·X as a model-local function (inner tensor `t`). */
export function functionModel() {
  const fn = onnx.FunctionProto.create({
    name: 'Twice',
    domain: 'custom',
    input: ['X'],
    output: ['Y'],
    node: [node('Add', ['X', 'X'], ['t']), node('Mul', ['t', 'X'], ['Y'])],
    opsetImport: [{ domain: '', version: 13 }],
  })
  return model(
    {
      name: 'function_model',
      node: [node('Relu', ['x'], ['a']), node('Twice', ['a'], ['y'], 'call_twice', { domain: 'custom' })],
      input: [vi('x', ['N', 4])],
      output: [vi('y', ['N', 4])],
    },
    {
      opsetImport: [
        { domain: '', version: 13 },
        { domain: 'custom', version: 1 },
      ],
      functions: [fn],
    },
  )
}

/** ONNX bytes of a fixture. */
export function bytesOf(m: InstanceType<typeof onnx.ModelProto>): Uint8Array {
  return onnx.ModelProto.encode(m).finish()
}
