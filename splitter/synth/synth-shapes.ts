/**
 * Hyper-parameters of real Llama-family checkpoints, for random-weight models of the same tensor shapes. Values from
 * each model's Hugging Face config.json: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
 * num_key_value_heads, vocab_size, max_position_embeddings, rope_theta, rms_norm_eps, tie_word_embeddings.
 */
import type { LlamaConfig } from '../model.ts'

/** One synthesizable shape: a config plus whether the classifier is tied to the embedding. */
export interface SynthShape {
  readonly config: LlamaConfig
  /** `output.weight` is the embedding (not stored), as in the real checkpoint. */
  readonly tiedEmbeddings: boolean
  /** Where the numbers come from. */
  readonly source: string
  /** Test-only shapes are accepted but not listed in help. */
  readonly testOnly?: boolean
}

function llama(c: Omit<LlamaConfig, 'arch' | 'headDim' | 'ropeStyle'>): LlamaConfig {
  return { arch: 'llama', headDim: c.dim / c.nHeads, ropeStyle: 'adjacent', ...c }
}

function qwen2(c: Omit<LlamaConfig, 'arch' | 'headDim' | 'ropeStyle' | 'qkvBias'>): LlamaConfig {
  return { arch: 'qwen2', headDim: c.dim / c.nHeads, ropeStyle: 'halves', qkvBias: true, ...c }
}

/** Shapes by `--shape` name. */
export const SYNTH_SHAPES: Readonly<Record<string, SynthShape>> = {
  'tinyllama-1.1b': {
    config: llama({
      dim: 2048, hiddenDim: 5632, nLayers: 22, nHeads: 32, nKvHeads: 4, vocabSize: 32000, maxSeqLen: 2048,
      normEps: 1e-5, ropeTheta: 10000,
    }),
    tiedEmbeddings: false,
    source: 'TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json',
  },
  'llama-3.2-1b': {
    // rope_scaling (llama3, factor 32) is not modelled: the context is the pre-scaling 8192 × 16 = 131072 as declared.
    config: llama({
      dim: 2048, hiddenDim: 8192, nLayers: 16, nHeads: 32, nKvHeads: 8, vocabSize: 128256, maxSeqLen: 131072,
      normEps: 1e-5, ropeTheta: 500000,
    }),
    tiedEmbeddings: true,
    source: 'meta-llama/Llama-3.2-1B config.json',
  },
  'qwen2.5-0.5b': {
    config: qwen2({
      dim: 896, hiddenDim: 4864, nLayers: 24, nHeads: 14, nKvHeads: 2, vocabSize: 151936, maxSeqLen: 32768,
      normEps: 1e-6, ropeTheta: 1000000,
    }),
    tiedEmbeddings: true,
    source: 'Qwen/Qwen2.5-0.5B config.json',
  },
  'llama-2-7b': {
    config: llama({
      dim: 4096, hiddenDim: 11008, nLayers: 32, nHeads: 32, nKvHeads: 32, vocabSize: 32000, maxSeqLen: 4096,
      normEps: 1e-5, ropeTheta: 10000,
    }),
    tiedEmbeddings: false,
    source: 'meta-llama/Llama-2-7b-hf config.json',
  },
  'llama-2-13b': {
    config: llama({
      dim: 5120, hiddenDim: 13824, nLayers: 40, nHeads: 40, nKvHeads: 40, vocabSize: 32000, maxSeqLen: 4096,
      normEps: 1e-5, ropeTheta: 10000,
    }),
    tiedEmbeddings: false,
    source: 'meta-llama/Llama-2-13b-hf config.json',
  },
  'test-stream': {
    // Large enough that a worker's shard is several times a small memory budget (sliding-window tests): 16 MiB of
    // f32 weights per layer, 128 MiB in all.
    config: llama({
      dim: 512, hiddenDim: 2048, nLayers: 8, nHeads: 8, nKvHeads: 8, vocabSize: 512, maxSeqLen: 256,
      normEps: 1e-5, ropeTheta: 10000,
    }),
    tiedEmbeddings: false,
    source: 'test only',
    testOnly: true,
  },
  'test-llama': {
    config: llama({
      dim: 64, hiddenDim: 128, nLayers: 2, nHeads: 4, nKvHeads: 2, vocabSize: 512, maxSeqLen: 256,
      normEps: 1e-5, ropeTheta: 10000,
    }),
    tiedEmbeddings: false,
    source: 'test only',
    testOnly: true,
  },
  'test-qwen2': {
    config: qwen2({
      dim: 64, hiddenDim: 96, nLayers: 2, nHeads: 4, nKvHeads: 2, vocabSize: 480, maxSeqLen: 256,
      normEps: 1e-6, ropeTheta: 1000000,
    }),
    tiedEmbeddings: true,
    source: 'test only',
    testOnly: true,
  },
}

/** The public shape names (help text, error messages). */
export const SYNTH_SHAPE_NAMES: readonly string[] = Object.keys(SYNTH_SHAPES).filter((n) => !SYNTH_SHAPES[n]!.testOnly)
