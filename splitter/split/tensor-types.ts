/**
 * Element types of tensors at a cut, named as onnxruntime names them, with their ONNX `TensorProto.DataType` codes
 * (onnx/onnx.proto3) and sizes.
 */

/** Element type names (onnxruntime's `Tensor.type` strings). */
export type ElementType =
  | 'float32'
  | 'uint8'
  | 'int8'
  | 'uint16'
  | 'int16'
  | 'int32'
  | 'int64'
  | 'bool'
  | 'float16'
  | 'float64'
  | 'uint32'
  | 'uint64'

/** ONNX `TensorProto.DataType` code of each element type. */
export const ONNX_TYPE_CODE: Readonly<Record<ElementType, number>> = {
  float32: 1,
  uint8: 2,
  int8: 3,
  uint16: 4,
  int16: 5,
  int32: 6,
  int64: 7,
  bool: 9,
  float16: 10,
  float64: 11,
  uint32: 12,
  uint64: 13,
}

/** Bytes per element of each element type. */
export const ELEMENT_BYTES: Readonly<Record<ElementType, number>> = {
  float32: 4,
  uint8: 1,
  int8: 1,
  uint16: 2,
  int16: 2,
  int32: 4,
  int64: 8,
  bool: 1,
  float16: 2,
  float64: 8,
  uint32: 4,
  uint64: 8,
}

const BY_CODE = new Map<number, ElementType>(
  (Object.entries(ONNX_TYPE_CODE) as [ElementType, number][]).map(([name, code]) => [code, name]),
)

/** The element type of an ONNX `TensorProto.DataType` code, or undefined for codes a cut cannot carry (string…). */
export function elementTypeOfCode(code: number): ElementType | undefined {
  return BY_CODE.get(code)
}

/** True when `name` is an {@link ElementType}. */
export function isElementType(name: string): name is ElementType {
  return Object.hasOwn(ONNX_TYPE_CODE, name)
}

/** A tensor seen in a real run: element type and concrete shape (outermost first). */
export interface ObservedTensor {
  readonly type: ElementType
  readonly dims: readonly number[]
}

/**
 * What one real run of a model showed: the batch size fed (dimension 0 of the inputs) and the type and shape of
 * every tensor that was fetched.
 */
export interface Observation {
  readonly batch: number
  readonly tensors: ReadonlyMap<string, ObservedTensor>
}

/** Bytes of a tensor of `type` and `dims`. */
export function tensorByteLength(type: ElementType, dims: readonly number[]): number {
  return dims.reduce((a, b) => a * b, 1) * ELEMENT_BYTES[type]
}
