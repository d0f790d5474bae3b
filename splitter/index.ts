/** splitter/: model descriptions, tensor-parallel planning and slicing, ONNX graph building. */
export type { DType, LlamaConfig, ModelDescription, TensorRef, Vocabulary } from './model.ts'
export { ChatTemplateError, InsufficientMemoryError, ModelFormatError, TokenizerFormatError } from './errors.ts'
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
export { readTensorBytes, readTensorF32, readTensorRange } from './formats/read-tensor.ts'
export {
  MAX_SAFETENSORS_HEADER_BYTES,
  readSafetensorsHeader,
  type SafetensorsHeader,
  type SafetensorsTensor,
} from './formats/safetensors.ts'
export { canonicalTensorName, hfTensorName, readHfFolder } from './formats/hf-folder.ts'
export { ggufBpeTokenizerJson } from './formats/gguf-bpe-tokenizer.ts'
export {
  type PlanModelShape,
  type ShardSpec,
  type TensorParallelOptions,
  type TensorParallelPlan,
  type UnitRange,
  planTensorParallel,
  proportionalShares,
} from './tensor-parallel-plan.ts'
export { formatLayers, layerGroupSizes, MAX_GRAPH_WEIGHT_BYTES } from './layer-range.ts'
export {
  type ClusterPlan,
  type ClusterPlanChoice,
  type ClusterPlanInput,
  type ClusterPlanOptions,
  formatBytes,
  type PlanAlternative,
  planClusterChoice,
  planEvenTensorParallel,
  type StagePlan,
  waterFill,
} from './cluster-plan.ts'
export {
  attentionShareBytes,
  blockOverheadMs,
  type ClusterCostInput,
  type ClusterCostOptions,
  DEFAULT_BLOCK_OVERHEAD_MS,
  ffnShareBytes,
  messageOverheadMs,
  type PlanCost,
  type PlannerDevice,
  type PlannerLink,
  planMemoryBytes,
  predictClusterPlan,
  stageMemoryBytes,
  wholeLayerGraphs,
} from './cluster-cost.ts'
export { type LayerStorage, type ModelCostShape, modelCostShape, uniformModelCostShape, type WeightStorage, weightStorage } from './model-cost.ts'
export {
  buildClusterPlan,
  checkClusterPlan,
  evenLayerCounts,
  hybridClusterPlan,
  parseStageLayout,
  pipelineClusterPlan,
  planKind,
  type StageLayout,
  type StagePlanOptions,
  tensorParallelClusterPlan,
} from './stage-plans.ts'
export {
  type AttentionShardWeights,
  type F32Weight,
  type FfnShardWeights,
  type LayerShardWeights,
  type LinearWeight,
  type StreamedLinearWeight,
  linearColumns,
  linearRows,
  sliceColumns,
  sliceLayerShard,
  sliceRows,
  toLinearWeight,
  type WeightSource,
} from './slice.ts'
export { ModelWeights } from './model-weights.ts'
export { type BlockwiseWeight, blockwiseBytes, blockwiseView, blockwiseZeroPoint, nbitsToBlockwise } from './quant/blockwise.ts'
export { ggmlColumnsToNBits, ggmlToNBits, type NBitsWeight, nbitsColumns, nbitsRowF32, nbitsRows } from './quant/matmul-nbits.ts'
export {
  type AttentionKernel,
  type AttentionShardShape,
  attentionKernel,
  buildAttentionBlock,
  buildDecoderLayers,
  buildFfnBlock,
  buildOutputHead,
  type FfnShardShape,
  type GraphConstants,
  ropeCaches,
  ropeTables,
  type WeightBits,
  type QuantizedInputs,
  type QuantizedMatmul,
} from './graph/llama-blocks.ts'
export { GraphBuilder } from './graph/onnx-builder.ts'
export {
  bf16BytesToF32,
  dequantizeQ4_0,
  dequantizeQ8_0,
  f16BytesToF32,
  f32ToBf16Bytes,
  f32ToF16Bytes,
  Q4_0_BLOCK_BYTES,
  Q8_0_BLOCK_BYTES,
  QK,
  quantizeQ4_0,
  quantizeQ8_0,
  tensorBytes,
} from './quant/ggml-blocks.ts'
export { decodeToF32, encodeFromF32 } from './quant/dtype-codec.ts'
export {
  type ByteChunks,
  GGML_TYPE_IDS,
  type GgufNumberType,
  type GgufTensorSpec,
  type GgufTypedNumber,
  type GgufWriteValue,
  gguf,
  type WriteGgufOptions,
  type WriteGgufResult,
  writeGguf,
} from './formats/gguf-writer.ts'
export {
  chooseTensorType,
  type GgufExport,
  type GgufExportOptions,
  type GgufExportType,
  ggufBpeVocabMetadata,
  ggufConfigMetadata,
  ggufLlamaVocabMetadata,
  LLAMA_FILE_TYPES,
  planGgufExport,
} from './formats/gguf-export.ts'
export { planSynthGguf, SYNTH_WEIGHT_STD, type SynthOptions } from './synth/synth-model.ts'
export { SYNTH_SHAPE_NAMES, SYNTH_SHAPES, type SynthShape } from './synth/synth-shapes.ts'
export { MIN_SYNTH_VOCAB, synthVocabulary } from './synth/synth-vocabulary.ts'
export {
  type CrossingTensor,
  type CutDim,
  type CutOptions,
  crossingTensor,
  cutModel,
  type ModelCut,
} from './split/graph-cut.ts'
export { type CutCandidate, exposeAllTensors, listCandidates } from './split/candidates.ts'
export { ControlFlowCutError, CutError, LocalFunctionCutError, PlanError } from './split/errors.ts'
export { externalDataLocations, toExternalData } from './split/external-data.ts'
export {
  analyzeGraph,
  decodeModel,
  encodeModel,
  type GraphAnalysis,
  type GraphNode,
  type OnnxModel,
} from './split/onnx-graph.ts'
export {
  type ElementType,
  elementTypeOfCode,
  isElementType,
  type Observation,
  type ObservedTensor,
  tensorByteLength,
} from './split/tensor-types.ts'
export {
  type DeviceProfile,
  type LinkProfile,
  linkMoved,
  type PlanInput,
  type PlannedOption,
  planSplit,
  predict,
  Replanner,
  type SplitOption,
  type SplitPlan,
  transferMs,
} from './split/planner.ts'
