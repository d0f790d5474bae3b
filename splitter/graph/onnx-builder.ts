import onnxProto from 'onnx-proto'

const { onnx } = onnxProto

/** ONNX opset the built graphs declare (default domain); `com.microsoft` contrib ops use opset 1. */
export const ONNX_OPSET = 17
/** ONNX IR version written (IR 8 goes with opset 17). */
export const ONNX_IR_VERSION = 8

/** Element types used in built graphs (ONNX `TensorProto.DataType`). */
export type ElemType = 'float32' | 'float16' | 'int64' | 'int32' | 'uint8' | 'int8'

const ELEM_TYPE_CODE: Record<ElemType, number> = {
  float32: onnx.TensorProto.DataType.FLOAT,
  float16: onnx.TensorProto.DataType.FLOAT16,
  int64: onnx.TensorProto.DataType.INT64,
  int32: onnx.TensorProto.DataType.INT32,
  uint8: onnx.TensorProto.DataType.UINT8,
  int8: onnx.TensorProto.DataType.INT8,
}

/** A dimension: a fixed size or a symbolic name (dynamic, e.g. `'seq'`). */
export type Dim = number | string

/** Attribute values accepted by {@link GraphBuilder.node}: numbers are INT unless listed in `floatAttrs`. */
export type AttrValue = number | string | readonly number[]

/** Raw bytes of a constant tensor with its ONNX element type and shape (outermost first). */
export interface ConstTensor {
  readonly type: ElemType
  readonly dims: readonly number[]
  readonly bytes: Uint8Array
}

function valueInfo(name: string, type: ElemType, dims: readonly Dim[]): InstanceType<typeof onnx.ValueInfoProto> {
  return onnx.ValueInfoProto.create({
    name,
    type: {
      tensorType: {
        elemType: ELEM_TYPE_CODE[type],
        shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) },
      },
    },
  })
}

function attribute(name: string, value: AttrValue, isFloat: boolean): InstanceType<typeof onnx.AttributeProto> {
  const T = onnx.AttributeProto.AttributeType
  if (typeof value === 'string') {
    return onnx.AttributeProto.create({ name, type: T.STRING, s: new TextEncoder().encode(value) })
  }
  if (typeof value === 'number') {
    return isFloat
      ? onnx.AttributeProto.create({ name, type: T.FLOAT, f: value })
      : onnx.AttributeProto.create({ name, type: T.INT, i: value })
  }
  return isFloat
    ? onnx.AttributeProto.create({ name, type: T.FLOATS, floats: [...value] })
    : onnx.AttributeProto.create({ name, type: T.INTS, ints: [...value] })
}

/**
 * A small builder for ONNX graphs (ONNX IR spec: ModelProto / GraphProto / NodeProto), serialised with onnx-proto.
 * Node outputs get unique generated names unless given; every method returns the tensor name(s) to chain with.
 *
 * @example
 * const g = new GraphBuilder('rmsnorm')
 * const x = g.input('x', 'float32', ['seq', 64])
 * g.output(g.node('Mul', [x, x])[0]!, 'y', 'float32', ['seq', 64])
 * const bytes = g.toBytes()
 */
export class GraphBuilder {
  readonly #name: string
  readonly #nodes: InstanceType<typeof onnx.NodeProto>[] = []
  readonly #inputs: InstanceType<typeof onnx.ValueInfoProto>[] = []
  readonly #outputs: InstanceType<typeof onnx.ValueInfoProto>[] = []
  readonly #initializers: InstanceType<typeof onnx.TensorProto>[] = []
  readonly #names = new Set<string>()
  #counter = 0
  #usesContrib = false

  constructor(name: string) {
    this.#name = name
  }

  #fresh(hint: string): string {
    let name: string
    do {
      name = `${hint}_${this.#counter++}`
    } while (this.#names.has(name))
    this.#names.add(name)
    return name
  }

  #claim(name: string): string {
    if (this.#names.has(name)) throw new RangeError(`cannot add tensor ${name} to graph ${this.#name}: name in use`)
    this.#names.add(name)
    return name
  }

  /** Declares a graph input; returns its name. */
  input(name: string, type: ElemType, dims: readonly Dim[]): string {
    this.#inputs.push(valueInfo(this.#claim(name), type, dims))
    return name
  }

  /** Declares `tensor` (an existing tensor name) as graph output `name` (an Identity node renames when needed). */
  output(tensor: string, name: string, type: ElemType, dims: readonly Dim[]): string {
    if (tensor !== name) this.#nodes.push(onnx.NodeProto.create({ opType: 'Identity', input: [tensor], output: [this.#claim(name)] }))
    this.#outputs.push(valueInfo(name, type, dims))
    return name
  }

  /** Adds a constant (initializer) and returns its name. */
  constant(hint: string, tensor: ConstTensor): string {
    const name = this.#fresh(hint)
    this.#initializers.push(
      onnx.TensorProto.create({ name, dataType: ELEM_TYPE_CODE[tensor.type], dims: [...tensor.dims], rawData: tensor.bytes }),
    )
    return name
  }

  /** A float32 constant of the given shape (a scalar when `dims` is empty). */
  f32(hint: string, values: readonly number[], dims: readonly number[] = values.length === 1 ? [] : [values.length]): string {
    const data = Float32Array.from(values)
    return this.constant(hint, { type: 'float32', dims, bytes: new Uint8Array(data.buffer) })
  }

  /** A uint8 scalar constant (zero points). */
  u8(hint: string, value: number): string {
    return this.constant(hint, { type: 'uint8', dims: [], bytes: Uint8Array.of(value) })
  }

  /** An int64 1-D constant (shapes, axes, split sizes). */
  i64(hint: string, values: readonly number[]): string {
    const data = BigInt64Array.from(values.map((v) => BigInt(v)))
    return this.constant(hint, { type: 'int64', dims: [values.length], bytes: new Uint8Array(data.buffer) })
  }

  /**
   * Adds a node; returns its output names (`nOutputs` fresh ones unless `outputs` are given).
   * `attrs` numbers are written as INT/INTS unless their key is listed in `floatAttrs`.
   */
  node(
    opType: string,
    inputs: readonly string[],
    options: {
      readonly attrs?: Readonly<Record<string, AttrValue>>
      readonly floatAttrs?: readonly string[]
      readonly nOutputs?: number
      readonly outputs?: readonly string[]
      readonly domain?: string
    } = {},
  ): string[] {
    const outputs = options.outputs
      ? options.outputs.map((o) => this.#claim(o))
      : Array.from({ length: options.nOutputs ?? 1 }, () => this.#fresh(opType.toLowerCase()))
    const floats = new Set(options.floatAttrs ?? [])
    const attrs = Object.entries(options.attrs ?? {}).map(([k, v]) => attribute(k, v, floats.has(k)))
    if (options.domain === 'com.microsoft') this.#usesContrib = true
    this.#nodes.push(
      onnx.NodeProto.create({
        opType,
        input: [...inputs],
        output: outputs,
        attribute: attrs,
        ...(options.domain ? { domain: options.domain } : {}),
        name: this.#fresh(`n_${opType}`),
      }),
    )
    return outputs
  }

  /** Shorthand for a single-output node. */
  op(opType: string, inputs: readonly string[], attrs?: Readonly<Record<string, AttrValue>>, floatAttrs?: readonly string[]): string {
    return this.node(opType, inputs, { ...(attrs ? { attrs } : {}), ...(floatAttrs ? { floatAttrs } : {}) })[0]!
  }

  /** Serialises the model (IR {@link ONNX_IR_VERSION}, opset {@link ONNX_OPSET}). */
  toBytes(): Uint8Array {
    const opsetImport = [{ domain: '', version: ONNX_OPSET }]
    if (this.#usesContrib) opsetImport.push({ domain: 'com.microsoft', version: 1 })
    const model = onnx.ModelProto.create({
      irVersion: ONNX_IR_VERSION,
      producerName: 'edgeshard',
      opsetImport,
      graph: onnx.GraphProto.create({
        name: this.#name,
        node: this.#nodes,
        input: this.#inputs,
        output: this.#outputs,
        initializer: this.#initializers,
      }),
    })
    return onnx.ModelProto.encode(model).finish()
  }
}
