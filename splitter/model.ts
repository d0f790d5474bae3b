/**
 * The one model description every format loads into: a config plus named tensors that point into the model file.
 * Formats (llama2.c, GGUF, later safetensors) only fill this shape; planning and slicing read nothing else.
 */

/** Element types of stored tensors. Raw bytes are little-endian. */
export type DType = 'f32' | 'f16'

/**
 * A tensor stored in a model file, not yet read.
 * `shape` is outermost first (row-major): a linear layer with `in` inputs and `out` outputs is `[out, in]`, i.e.
 * `out` rows of `in` contiguous values (GGUF lists the same tensor as `ne = [in, out]`).
 */
export interface TensorRef {
  readonly name: string
  readonly dtype: DType
  readonly shape: readonly number[]
  /** Absolute byte offset of the first element in `ModelDescription.path`. */
  readonly offsetBytes: number
  readonly byteLength: number
}

/** Hyper-parameters of a Llama-family decoder (llama2.c `Config`, GGUF `llama.*` keys). */
export interface LlamaConfig {
  readonly arch: 'llama'
  /** Model width (embedding length). */
  readonly dim: number
  /** FFN inner width (SwiGLU gate/up outputs). */
  readonly hiddenDim: number
  readonly nLayers: number
  /** Query heads. */
  readonly nHeads: number
  /** Key/value heads (GQA: nHeads is a multiple of nKvHeads). */
  readonly nKvHeads: number
  /** dim / nHeads unless the format says otherwise. */
  readonly headDim: number
  readonly vocabSize: number
  /** Longest context the model was trained for (positions). */
  readonly maxSeqLen: number
  /** RMSNorm epsilon (llama2.c: 1e-5). */
  readonly normEps: number
  /** RoPE base frequency theta (llama2.c: 10000). */
  readonly ropeTheta: number
  /**
   * Which dimensions RoPE rotates together: 'adjacent' = (2i, 2i+1) as llama2.c and GGUF `llama`;
   * 'halves' = (i, i + headDim/2) as Hugging Face Llama and GGUF `qwen2` (NEOX).
   */
  readonly ropeStyle: 'adjacent' | 'halves'
}

/** A sentencepiece-style vocabulary (llama2.c tokenizer.bin, GGUF `tokenizer.ggml.*` with model `llama`). */
export interface Vocabulary {
  readonly model: 'llama'
  /** Piece text per token id; byte-fallback pieces look like `<0x0A>`. */
  readonly tokens: readonly string[]
  /** Merge score per token id (higher merges first). */
  readonly scores: Float32Array
  readonly bosId: number
  readonly eosId: number
}

/**
 * Canonical tensor names (GGUF naming, `{i}` = layer index):
 * `token_embd.weight` [vocab, dim]; `blk.{i}.attn_norm.weight` [dim]; `blk.{i}.attn_q.weight` [nHeads*headDim, dim];
 * `blk.{i}.attn_k.weight` / `attn_v` [nKvHeads*headDim, dim]; `blk.{i}.attn_output.weight` [dim, nHeads*headDim];
 * `blk.{i}.ffn_norm.weight` [dim]; `blk.{i}.ffn_gate.weight` (w1) / `ffn_up` (w3) [hiddenDim, dim];
 * `blk.{i}.ffn_down.weight` (w2) [dim, hiddenDim]; `output_norm.weight` [dim]; `output.weight` [vocab, dim]
 * (a shared classifier points at the same bytes as `token_embd.weight`).
 */
export interface ModelDescription {
  /** The file the tensor offsets refer to. */
  readonly path: string
  readonly format: 'llama2c' | 'gguf'
  readonly config: LlamaConfig
  readonly tensors: ReadonlyMap<string, TensorRef>
  /** Present when the file carries its own vocabulary (GGUF); llama2.c needs a separate tokenizer file. */
  readonly vocab?: Vocabulary
}
