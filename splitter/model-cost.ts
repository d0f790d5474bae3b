/**
 * The structural facts about a model that the cluster planner's cost model needs: its config, and for every layer how
 * many bytes each linear weight occupies per element once resident on a peer (which is also what one decode step reads).
 * Pure; built from a `ModelDescription` (tensor dtypes) or from a config and one storage type.
 */
import type { DType, LlamaConfig, ModelDescription } from './model.ts'

/** How one linear weight is held by a peer. */
export interface WeightStorage {
  /**
   * Resident bytes per weight: 4 for f32/f16/bf16 (f16 and bf16 are widened to f32, splitter/slice.ts), 36/32 for
   * q8_0 and 20/32 for q4_0 (MatMulNBits blob of 32·bits/8 bytes + one f32 scale per 32 weights).
   */
  readonly bytesPerElement: number
  /** True for MatMulNBits weights (q4_0, q8_0): decode reads them at the device's `decodeNBitsGBs`. */
  readonly quantized: boolean
}

/** Storage of the seven linear weights of one decoder layer (GGUF names: attn_q/k/v/output, ffn_gate/down/up). */
export interface LayerStorage {
  /** [nHeads·headDim, dim] */
  readonly wq: WeightStorage
  /** [nKvHeads·headDim, dim] */
  readonly wk: WeightStorage
  /** [nKvHeads·headDim, dim] */
  readonly wv: WeightStorage
  /** [dim, nHeads·headDim] */
  readonly wo: WeightStorage
  /** gate [hiddenDim, dim] */
  readonly w1: WeightStorage
  /** down [dim, hiddenDim] */
  readonly w2: WeightStorage
  /** up [hiddenDim, dim] */
  readonly w3: WeightStorage
}

/** What the planner knows about a model. */
export interface ModelCostShape {
  readonly config: LlamaConfig
  /** Storage per layer, [nLayers]. */
  readonly layers: readonly LayerStorage[]
  /** Resident bytes the master holds besides its shards: embedding, final norm and classifier (once if shared). */
  readonly masterBytes: number
  /** Bytes of the classifier the master reads for every token ([vocab, dim] at its storage). */
  readonly classifierBytes: number
  /** True when the classifier is block-quantized (read at `decodeNBitsGBs`). */
  readonly classifierQuantized: boolean
  /** FFN share granularity in columns: 32 when any W2 is block-quantized, else 1 (as agent/cluster.ts plans). */
  readonly ffnBlock: number
  /** Output-projection column granularity: 32 when any Wo is block-quantized, else 1. */
  readonly attentionBlock: number
}

/** Resident storage of a weight stored as `dtype` (see {@link WeightStorage}). */
export function weightStorage(dtype: DType): WeightStorage {
  if (dtype === 'q4_0') return { bytesPerElement: 20 / 32, quantized: true }
  if (dtype === 'q8_0') return { bytesPerElement: 36 / 32, quantized: true }
  return { bytesPerElement: 4, quantized: false }
}

const LAYER_TENSORS = {
  wq: 'attn_q',
  wk: 'attn_k',
  wv: 'attn_v',
  wo: 'attn_output',
  w1: 'ffn_gate',
  w2: 'ffn_down',
  w3: 'ffn_up',
} as const

/**
 * The cost shape of a loaded model (reads only the tensor table, no weights).
 * @throws RangeError naming the tensor when a layer weight is missing
 */
export function modelCostShape(model: ModelDescription): ModelCostShape {
  const { config } = model
  const dtypeOf = (name: string): DType => {
    const t = model.tensors.get(name)
    if (!t) throw new RangeError(`cannot plan ${model.path}: tensor ${name} is missing`)
    return t.dtype
  }
  const layers: LayerStorage[] = []
  for (let i = 0; i < config.nLayers; i++) {
    const entry = (key: keyof typeof LAYER_TENSORS): WeightStorage => weightStorage(dtypeOf(`blk.${i}.${LAYER_TENSORS[key]}.weight`))
    layers.push({ wq: entry('wq'), wk: entry('wk'), wv: entry('wv'), wo: entry('wo'), w1: entry('w1'), w2: entry('w2'), w3: entry('w3') })
  }
  const embedding = model.tensors.get('token_embd.weight')
  const classifier = model.tensors.get('output.weight') ?? embedding
  const matrixBytes = config.vocabSize * config.dim
  const embeddingBytes = embedding ? matrixBytes * weightStorage(embedding.dtype).bytesPerElement : 0
  const classifierStorage = weightStorage(classifier?.dtype ?? 'f32')
  const classifierBytes = matrixBytes * classifierStorage.bytesPerElement
  const shared = embedding !== undefined && classifier !== undefined && classifier.offsetBytes === embedding.offsetBytes && classifier.file === embedding.file
  return {
    config,
    layers,
    masterBytes: embeddingBytes + (shared ? 0 : classifierBytes) + config.dim * 4,
    classifierBytes,
    classifierQuantized: classifierStorage.quantized,
    ffnBlock: layers.some((l) => l.w2.quantized) ? 32 : 1,
    attentionBlock: layers.some((l) => l.wo.quantized) ? 32 : 1,
  }
}

/**
 * The cost shape of a model whose every linear weight, embedding and classifier is stored as `dtype` (synthetic
 * shapes, tests, benchmarks). The classifier is separate from the embedding unless `sharedClassifier`.
 */
export function uniformModelCostShape(config: LlamaConfig, dtype: DType, options: { sharedClassifier?: boolean } = {}): ModelCostShape {
  const s = weightStorage(dtype)
  const layer: LayerStorage = { wq: s, wk: s, wv: s, wo: s, w1: s, w2: s, w3: s }
  const matrixBytes = config.vocabSize * config.dim * s.bytesPerElement
  return {
    config,
    layers: Array.from({ length: config.nLayers }, () => layer),
    masterBytes: matrixBytes * (options.sharedClassifier ? 1 : 2) + config.dim * 4,
    classifierBytes: matrixBytes,
    classifierQuantized: s.quantized,
    ffnBlock: s.quantized ? 32 : 1,
    attentionBlock: s.quantized ? 32 : 1,
  }
}
