/** splitter/: model descriptions, tensor-parallel planning and slicing, ONNX graph building. */
export type { DType, LlamaConfig, ModelDescription, TensorRef, Vocabulary } from './model.ts'
export { ModelFormatError, TokenizerFormatError } from './errors.ts'
export { loadModel } from './formats/load-model.ts'
export { readLlama2c } from './formats/llama2c.ts'
export {
  type GgufArray,
  type GgufHeader,
  type GgufTensorInfo,
  type GgufValue,
  ggmlTypeName,
  readGguf,
  readGgufMetadata,
} from './formats/gguf.ts'
export { readTensorBytes, readTensorF32 } from './formats/read-tensor.ts'
export {
  type PlanModelShape,
  type ShardSpec,
  type TensorParallelOptions,
  type TensorParallelPlan,
  type UnitRange,
  planTensorParallel,
  proportionalShares,
} from './tensor-parallel-plan.ts'
export {
  type AttentionShardWeights,
  type FfnShardWeights,
  type LayerShardWeights,
  sliceColumns,
  sliceLayerShard,
  sliceRows,
} from './slice.ts'
export { buildAttentionBlock, buildFfnBlock, buildOutputHead, ropeTables } from './graph/llama-blocks.ts'
export { GraphBuilder } from './graph/onnx-builder.ts'
