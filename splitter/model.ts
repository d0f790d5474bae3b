/**
 * The one model description every format loads into: a config plus named tensors that point into the model file.
 * Formats (llama2.c, GGUF, later safetensors) only fill this shape; planning and slicing read nothing else.
 */

/**
 * Element types of stored tensors. Raw bytes are little-endian. Block-quantized types follow ggml (GGUF spec):
 * `q8_0` blocks of 32 weights = f16 scale + 32 int8 (34 bytes); `q4_0` blocks of 32 = f16 scale + 16 bytes of
 * nibbles, low nibbles weights 0–15, high nibbles 16–31, value (q − 8)·scale (18 bytes). Blocks run along the
 * innermost (input) dimension.
 */
export type DType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_0'

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
  /** The file holding this tensor when it is not `ModelDescription.path` (sharded safetensors). */
  readonly file?: string
}

/** Hyper-parameters of a Llama-family decoder (llama2.c `Config`, GGUF `llama.*` keys). */
export interface LlamaConfig {
  /** 'llama' (Llama 1/2/3, Mistral, TinyLlama) or 'qwen2' (Q/K/V projections carry a bias). */
  readonly arch: 'llama' | 'qwen2'
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
  /** Q/K/V projections have biases `blk.{i}.attn_q.bias` etc. (Qwen2). Absent = false. */
  readonly qkvBias?: boolean
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
 * (a shared classifier points at the same bytes as `token_embd.weight`); with `qkvBias`, `blk.{i}.attn_q.bias`
 * [nHeads*headDim] and `attn_k.bias` / `attn_v.bias` [nKvHeads*headDim].
 */
export interface ModelDescription {
  /** The file the tensor offsets refer to. */
  readonly path: string
  readonly format: 'llama2c' | 'gguf' | 'safetensors'
  readonly config: LlamaConfig
  readonly tensors: ReadonlyMap<string, TensorRef>
  /** A sentencepiece vocabulary carried by the file (GGUF `llama`); llama2.c needs a separate tokenizer file. */
  readonly vocab?: Vocabulary
  /**
   * A Hugging Face tokenizer.json document, for byte-level BPE and other non-sentencepiece vocabularies (HF folders;
   * GGUF `gpt2` vocabularies are converted to one).
   */
  readonly tokenizerJson?: string
  /** BOS / EOS ids when known from the file (tokenizer_config.json, GGUF `tokenizer.ggml.*_token_id`). */
  readonly bosId?: number
  readonly eosId?: number
  /** Jinja chat template (GGUF `tokenizer.chat_template`, tokenizer_config.json `chat_template`). */
  readonly chatTemplate?: string
}
