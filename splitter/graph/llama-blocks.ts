import { GraphBuilder } from './onnx-builder.ts'

/**
 * ONNX graphs for one peer's share of a Llama decoder layer, after TPI-LLM / Megatron-LM tensor parallelism
 * (Shoeybi et al. 2019 §3; Li et al., TPI-LLM 2024 §3.1): the attention block owns whole KV heads and their query
 * heads and returns a partial sum of the output projection; the FFN block owns a range of SwiGLU columns and returns a
 * partial sum of the down projection. The partial sums are allreduced outside the graph.
 *
 * Weights are graph inputs (the caller owns the buffers, ORT reads them in place, one session serves every layer and
 * weights can be streamed from disk), or, given as `constants`, initializers baked into a per-layer graph (ORT
 * pre-packs them: the fast resident path, and the only fast one for MatMulNBits). Linear weights are stored
 * `[out, in]` and applied with `Gemm(transB=1)` or `MatMulNBits`.
 */

/** Weights to bake into a graph as initializers, by graph input name (typed array and shape, outermost first). */
export type GraphConstants = Readonly<Record<string, { readonly data: Float32Array | Uint8Array; readonly dims: readonly number[] }>>

/**
 * Declares weight `name`: an initializer when `constants` has it (ORT pre-packs constant weights, and MatMulNBits
 * is only fast with a constant B), else a graph input.
 */
function param(g: GraphBuilder, constants: GraphConstants | undefined, name: string, type: 'float32' | 'uint8', dims: readonly number[]): string {
  const c = constants?.[name]
  if (!c) return g.input(name, type, dims)
  const expected = dims.reduce((a, b) => a * b, 1)
  if (c.data.length !== expected) throw new RangeError(`cannot bake ${name}: ${c.data.length} values, the graph needs [${dims.join(', ')}]`)
  return g.constant(name, { type, dims, bytes: new Uint8Array(c.data.buffer, c.data.byteOffset, c.data.byteLength) })
}

/** Shape of one peer's attention share. */
export interface AttentionShardShape {
  /** Model width. */
  readonly dim: number
  readonly headDim: number
  /** Query heads owned by this peer (a multiple of `kvHeads`). */
  readonly heads: number
  /** KV heads owned by this peer (≥ 1). */
  readonly kvHeads: number
  readonly normEps: number
  /** Pairing of rotated dimensions: 'adjacent' (2i, 2i+1) or 'halves' (i, i + headDim/2). */
  readonly ropeStyle: 'adjacent' | 'halves'
  /** Storage of each projection. */
  readonly bits: { readonly wq: WeightBits; readonly wk: WeightBits; readonly wv: WeightBits; readonly wo: WeightBits }
  /** How quantized matmuls treat activations (see {@link QuantizedMatmul}); default 'exact'. */
  readonly quantizedMatmul?: QuantizedMatmul
  /** Layout and kernel of quantized weights fed as graph inputs (see {@link QuantizedInputs}); default 'nbits'. */
  readonly quantizedInputs?: QuantizedInputs
  /** Q/K/V biases as inputs `bq` [heads*headDim], `bk` / `bv` [kvHeads*headDim] f32 (Qwen2). */
  readonly qkvBias: boolean
}

/**
 * Attention block graph.
 *
 * Inputs:
 * - `x` [seq, dim] f32: hidden state entering the layer (full width, replicated on every peer)
 * - `cos`, `sin` [seq, headDim] f32: RoPE tables for the positions of `x` (see {@link ropeTables})
 * - `mask` [seq, total] f32: additive causal mask (0 or -Infinity), total = past + seq
 * - `past_k`, `past_v` [kvHeads, past, headDim] f32: this peer's KV cache
 * - `attn_norm` [dim] f32; linear weights `wq` [heads*headDim, dim], `wk` / `wv` [kvHeads*headDim, dim],
 *   `wo` [dim, heads*headDim], each dense or quantized per `shape.bits` (see `linear`); `bq`, `bk`, `bv` with qkvBias
 *
 * Outputs: `partial` [seq, dim] f32 (this peer's term of `attention(x) @ Wo^T`), `present_k` / `present_v`
 * [kvHeads, total, headDim] f32 (the KV cache with this step appended).
 */
export function buildAttentionBlock(shape: AttentionShardShape, constants?: GraphConstants): Uint8Array {
  const { dim, headDim, heads, kvHeads, normEps, ropeStyle, bits } = shape
  if (kvHeads < 1 || heads % kvHeads !== 0) {
    throw new RangeError(`cannot build attention block: ${heads} query heads do not group over ${kvHeads} KV heads`)
  }
  if (headDim % 2 !== 0) throw new RangeError(`cannot build attention block: RoPE needs an even head size, got ${headDim}`)
  const g = new GraphBuilder('edgeshard_attention')
  const x = g.input('x', 'float32', ['seq', dim])
  const cos = g.input('cos', 'float32', ['seq', headDim])
  const sin = g.input('sin', 'float32', ['seq', headDim])
  const mask = g.input('mask', 'float32', ['seq', 'total'])
  const pastK = g.input('past_k', 'float32', [kvHeads, 'past', headDim])
  const pastV = g.input('past_v', 'float32', [kvHeads, 'past', headDim])
  const normW = param(g, constants, 'attn_norm', 'float32', [dim])

  const xn = rmsNorm(g, x, normW, normEps)
  // Baked weights of one storage: a single matmul over [wq; wk; wv] (rows stacked), split into Q, K and V.
  let fusedQkv: readonly string[] | null = null
  if (constants?.wq && constants.wk && constants.wv && bits.wq === bits.wk && bits.wq === bits.wv) {
    const qkvRows = (heads + 2 * kvHeads) * headDim
    const qkv = linear(g, concatRows(constants, 'wqkv', ['wq', 'wk', 'wv'], bits.wq), xn, 'wqkv', qkvRows, dim, bits.wq, shape)
    const sizes = g.i64('split', [heads * headDim, kvHeads * headDim, kvHeads * headDim])
    fusedQkv = g.node('Split', [qkv, sizes], { attrs: { axis: -1 }, nOutputs: 3 })
  }
  const project = (name: 'wq' | 'wk' | 'wv', n: number, biasName: string): string => {
    const y = fusedQkv ? fusedQkv[['wq', 'wk', 'wv'].indexOf(name)]! : linear(g, constants, xn, name, n * headDim, dim, bits[name], shape)
    return shape.qkvBias ? g.op('Add', [y, param(g, constants, biasName, 'float32', [n * headDim])]) : y
  }
  // [seq, n*headDim] -> [n, seq, headDim]
  const headsFirst = (t: string, n: number): string =>
    g.op('Transpose', [g.op('Reshape', [t, g.i64('shape', [0, n, headDim])])], { perm: [1, 0, 2] })
  const q = rope(g, headsFirst(project('wq', heads, 'bq'), heads), cos, sin, headDim, ropeStyle)
  const k = rope(g, headsFirst(project('wk', kvHeads, 'bk'), kvHeads), cos, sin, headDim, ropeStyle)
  const v = headsFirst(project('wv', kvHeads, 'bv'), kvHeads)
  const presentK = g.op('Concat', [pastK, k], { axis: 1 }) // [kvHeads, total, headDim]
  const presentV = g.op('Concat', [pastV, v], { axis: 1 })

  // GQA: the `group` query heads of one KV head are adjacent, so [heads, seq, hd] -> [kvHeads, group*seq, hd].
  const qg = g.op('Reshape', [q, g.i64('shape', [kvHeads, -1, headDim])])
  const kT = g.op('Transpose', [presentK], { perm: [0, 2, 1] }) // [kvHeads, headDim, total]
  const scores = g.op('Mul', [g.op('MatMul', [qg, kT]), g.f32('scale', [1 / Math.sqrt(headDim)])]) // [kvHeads, group*seq, total]
  const scoresPerHead = g.op('Reshape', [scores, g.i64('shape', [heads, -1, 0])]) // [heads, seq, total]
  const probs = g.op('Softmax', [g.op('Add', [scoresPerHead, mask])], { axis: -1 })
  const probs3 = g.op('Reshape', [probs, g.i64('shape', [kvHeads, -1, 0])]) // [kvHeads, group*seq, total]
  const ctx = g.op('MatMul', [probs3, presentV]) // [kvHeads, group*seq, headDim]
  const ctxHeads = g.op('Reshape', [ctx, g.i64('shape', [heads, -1, headDim])]) // [heads, seq, headDim]
  const ctxRows = g.op('Reshape', [
    g.op('Transpose', [ctxHeads], { perm: [1, 0, 2] }),
    g.i64('shape', [0, heads * headDim]),
  ]) // [seq, heads*headDim]
  const partial = linear(g, constants, ctxRows, 'wo', dim, heads * headDim, bits.wo, shape) // [seq, dim]

  g.output(partial, 'partial', 'float32', ['seq', dim])
  g.output(presentK, 'present_k', 'float32', [kvHeads, 'total', headDim])
  g.output(presentV, 'present_v', 'float32', [kvHeads, 'total', headDim])
  return g.toBytes()
}

/**
 * Constants with linear weights `parts` stacked along their output rows as `name` (dense: f32 rows; quantized: the
 * MatMulNBits blobs [rows, blocks, bytes] and `_scales` [rows·blocks] are row-major, so stacking is concatenation).
 */
function concatRows(constants: GraphConstants, name: string, parts: readonly string[], bits: WeightBits): GraphConstants {
  const stack = (names: readonly string[]): { data: Float32Array | Uint8Array; dims: number[] } => {
    const items = names.map((n) => constants[n]!)
    const length = items.reduce((a, t) => a + t.data.length, 0)
    const data = items[0]!.data instanceof Float32Array ? new Float32Array(length) : new Uint8Array(length)
    let offset = 0
    for (const t of items) {
      data.set(t.data, offset)
      offset += t.data.length
    }
    return { data, dims: [items.reduce((a, t) => a + t.dims[0]!, 0), ...items[0]!.dims.slice(1)] }
  }
  if (bits === 32) return { ...constants, [name]: stack(parts) }
  return { ...constants, [name]: stack(parts), [`${name}_scales`]: stack(parts.map((p) => `${p}_scales`)) }
}

/** Shape of one peer's FFN share. */
export interface FfnShardShape {
  readonly dim: number
  /** SwiGLU columns owned by this peer (≥ 1). */
  readonly columns: number
  readonly normEps: number
  readonly bits: { readonly w1: WeightBits; readonly w3: WeightBits; readonly w2: WeightBits }
  readonly quantizedMatmul?: QuantizedMatmul
  readonly quantizedInputs?: QuantizedInputs
}

/**
 * SwiGLU FFN block graph: `partial = (silu(xn @ W1^T) * (xn @ W3^T)) @ W2^T`, xn = RMSNorm(h).
 *
 * Inputs: `h` [seq, dim] f32; `ffn_norm` [dim]; linear weights `w1` (gate) and `w3` (up) [columns, dim], `w2` (down)
 * [dim, columns], dense or quantized per `shape.bits`.
 * Output: `partial` [seq, dim] f32.
 */
export function buildFfnBlock(shape: FfnShardShape, constants?: GraphConstants): Uint8Array {
  const { dim, columns, normEps, bits } = shape
  if (columns < 1) throw new RangeError(`cannot build FFN block with ${columns} columns: need at least 1`)
  const g = new GraphBuilder('edgeshard_ffn')
  const h = g.input('h', 'float32', ['seq', dim])
  const normW = param(g, constants, 'ffn_norm', 'float32', [dim])
  const hn = rmsNorm(g, h, normW, normEps)
  const gate = linear(g, constants, hn, 'w1', columns, dim, bits.w1, shape)
  const up = linear(g, constants, hn, 'w3', columns, dim, bits.w3, shape)
  const act = g.op('Mul', [g.op('Mul', [gate, g.op('Sigmoid', [gate])]), up])
  g.output(linear(g, constants, act, 'w2', dim, columns, bits.w2, shape), 'partial', 'float32', ['seq', dim])
  return g.toBytes()
}

/** Shape of the master's output head. */
export interface OutputHeadShape {
  readonly dim: number
  readonly vocabSize: number
  readonly normEps: number
  readonly bits: WeightBits
  readonly quantizedMatmul?: QuantizedMatmul
}

/**
 * Final RMSNorm and classifier (master only): `logits = RMSNorm(x) @ Wcls^T`.
 * Inputs: `x` [seq, dim] f32, `output_norm` [dim], linear weight `wcls` [vocab, dim] (dense or quantized).
 * Output: `logits` [seq, vocab] f32.
 */
export function buildOutputHead(shape: OutputHeadShape, constants?: GraphConstants): Uint8Array {
  const { dim, vocabSize, normEps, bits } = shape
  const g = new GraphBuilder('edgeshard_output_head')
  const x = g.input('x', 'float32', ['seq', dim])
  const normW = param(g, constants, 'output_norm', 'float32', [dim])
  g.output(
    linear(g, constants, rmsNorm(g, x, normW, normEps), 'wcls', vocabSize, dim, bits, shape),
    'logits',
    'float32',
    ['seq', vocabSize],
  )
  return g.toBytes()
}

/**
 * Activations of quantized (MatMulNBits) matmuls: 'exact' keeps them f32 (accuracy_level 0, matches an f32 matmul
 * over the dequantized weights to ~1e-6); 'int8' quantizes them to 8 bits per block (accuracy_level 4), as
 * llama.cpp's Q4_0·Q8 dot products do, and runs 2–2.5× faster on CPUs with int8 dot-product instructions.
 */
export type QuantizedMatmul = 'exact' | 'int8'

/** Storage of a linear weight in a graph: 32 = dense f32 via Gemm, 8/4 = MatMulNBits blocks of 32. */
export type WeightBits = 32 | 8 | 4

/**
 * Quantized weights fed as graph inputs (a streamed sliding window; baked weights always use MatMulNBits):
 * - 'nbits': MatMulNBits blobs as for initializers. Exact, but ORT 1.30 runs MatMulNBits ~600× slower when B is not
 *   a constant: for tests and small models only.
 * - 'blockwise-int8': the blockwise layout (splitter/quant/blockwise.ts) through `MatMulInteger` batched over the
 *   K/32 blocks, activations quantized to int8 per row and block of 32 (symmetric, scale max|x|/127) as MatMulNBits'
 *   accuracy_level 4 does. For decode: its [in/32, seq, out] int32 intermediate grows with seq.
 * - 'blockwise-f32': the blockwise layout expanded to f32 [in, out] in the graph, then MatMul: exact activations, a
 *   transient f32 copy of the weight (4 bytes per weight). For prefill, where it is amortised over the rows.
 */
export type QuantizedInputs = 'nbits' | 'blockwise-int8' | 'blockwise-f32'

/**
 * Declares linear weight `name` [out, in] as graph input(s) or initializers and applies it to `x` [seq, in] →
 * [seq, out]. Dense: `name` f32 [out, in], `Gemm(transB=1)`. Quantized, baked or `quantizedInputs` 'nbits': `name`
 * uint8 [out, in/32, 32·bits/8] and `name_scales` f32 [out·in/32], `com.microsoft.MatMulNBits` with accuracy_level 0
 * or 4 (see {@link QuantizedMatmul}). Quantized blockwise inputs: `name` uint8 [in/32, 32, out] and `name_scales` f32
 * [in/32, 1, out] (see {@link QuantizedInputs}).
 */
function linear(
  g: GraphBuilder,
  constants: GraphConstants | undefined,
  x: string,
  name: string,
  out: number,
  inFeatures: number,
  bits: WeightBits,
  options: { readonly quantizedMatmul?: QuantizedMatmul; readonly quantizedInputs?: QuantizedInputs },
): string {
  if (bits === 32) return g.op('Gemm', [x, param(g, constants, name, 'float32', [out, inFeatures])], { transB: 1 })
  if (inFeatures % 32 !== 0) throw new RangeError(`cannot apply ${bits}-bit weight ${name}: ${inFeatures} inputs is not a multiple of 32`)
  const inputs = options.quantizedInputs ?? 'nbits'
  if (constants?.[name] || inputs === 'nbits') {
    const blob = param(g, constants, name, 'uint8', [out, inFeatures / 32, (32 * bits) / 8])
    const scales = param(g, constants, `${name}_scales`, 'float32', [(out * inFeatures) / 32])
    return g.node('MatMulNBits', [x, blob, scales], {
      attrs: { K: inFeatures, N: out, bits, block_size: 32, accuracy_level: options.quantizedMatmul === 'int8' ? 4 : 0 },
      domain: 'com.microsoft',
    })[0]!
  }
  const blocks = inFeatures / 32
  const values = g.input(name, 'uint8', [blocks, 32, out])
  const scales = g.input(`${name}_scales`, 'float32', [blocks, 1, out])
  const zeroPoint = bits === 4 ? 8 : 128
  if (inputs === 'blockwise-f32') {
    // (values − zp) · scale, [blocks, 32, out] f32 → [in, out], then x @ W.
    const w = g.op('Mul', [g.op('Sub', [g.op('Cast', [values], { to: 1 }), g.f32('zero_point', [zeroPoint])]), scales])
    return g.op('MatMul', [x, g.op('Reshape', [w, g.i64('shape', [inFeatures, out])])])
  }
  // x [seq, in] → [blocks, seq, 32]; per (block, row) symmetric int8 with scale max|x|/127, stored as uint8 q + 128.
  const xb = g.op('Transpose', [g.op('Reshape', [x, g.i64('shape', [0, blocks, 32])])], { perm: [1, 0, 2] })
  const amax = g.op('ReduceMax', [g.op('Abs', [xb])], { axes: [-1], keepdims: 1 }) // [blocks, seq, 1]
  const xScale = g.op('Div', [g.op('Max', [amax, g.f32('tiny', [1e-30])]), g.f32('int8_max', [127])])
  const xq = g.op('Cast', [g.op('Add', [g.op('Round', [g.op('Div', [xb, xScale])]), g.f32('offset', [128])])], { to: 2 }) // uint8
  const acc = g.op('MatMulInteger', [xq, values, g.u8('x_zero_point', 128), g.u8('w_zero_point', zeroPoint)]) // [blocks, seq, out] i32
  const terms = g.op('Mul', [g.op('Mul', [g.op('Cast', [acc], { to: 1 }), xScale]), scales])
  return g.op('ReduceSum', [terms, g.i64('axes', [0])], { keepdims: 0 }) // [seq, out]
}

/** RMSNorm over the last axis (Zhang & Sennrich 2019): `w * x / sqrt(mean(x²) + eps)`, as llama2.c's rmsnorm. */
function rmsNorm(g: GraphBuilder, x: string, weight: string, eps: number): string {
  const meanSquare = g.op('ReduceMean', [g.op('Mul', [x, x])], { axes: [-1], keepdims: 1 })
  const inv = g.op('Reciprocal', [g.op('Sqrt', [g.op('Add', [meanSquare, g.f32('eps', [eps])])])])
  return g.op('Mul', [weight, g.op('Mul', [x, inv])])
}

/**
 * RoPE (Su et al. 2021, eq. 34) on `t` [n, seq, headDim]: `t * cos + rotate(t) * sin` where rotate maps each pair
 * (a, b) to (-b, a). `cos`/`sin` [seq, headDim] repeat each angle over its pair.
 */
function rope(g: GraphBuilder, t: string, cos: string, sin: string, headDim: number, style: 'adjacent' | 'halves'): string {
  let rotated: string
  if (style === 'adjacent') {
    const pairs = g.op('Reshape', [t, g.i64('shape', [0, 0, headDim / 2, 2])])
    const [a, b] = g.node('Split', [pairs], { attrs: { axis: -1 }, nOutputs: 2 }) as [string, string]
    rotated = g.op('Reshape', [g.op('Concat', [g.op('Neg', [b]), a], { axis: -1 }), g.i64('shape', [0, 0, headDim])])
  } else {
    const [a, b] = g.node('Split', [t], { attrs: { axis: -1 }, nOutputs: 2 }) as [string, string]
    rotated = g.op('Concat', [g.op('Neg', [b]), a], { axis: -1 })
  }
  return g.op('Add', [g.op('Mul', [t, cos]), g.op('Mul', [rotated, sin])])
}

/**
 * RoPE tables for positions 0..maxSeqLen-1: `cos`/`sin` [maxSeqLen, headDim] f32 with angle
 * `pos * theta^(-2i/headDim)` for pair i, repeated over the pair's two slots (layout per `style`), as llama2.c's
 * run.c (`freq = 1 / pow(10000, head_dim / head_size)`). Rows for positions p..p+s are a zero-copy `subarray`.
 */
export function ropeTables(
  maxSeqLen: number,
  headDim: number,
  theta: number,
  style: 'adjacent' | 'halves',
): { cos: Float32Array; sin: Float32Array } {
  const cos = new Float32Array(maxSeqLen * headDim)
  const sin = new Float32Array(maxSeqLen * headDim)
  const half = headDim / 2
  for (let pos = 0; pos < maxSeqLen; pos++) {
    for (let i = 0; i < half; i++) {
      // Match run.c's float arithmetic: freq and angle in f32.
      const freq = Math.fround(1 / Math.fround(theta ** Math.fround((2 * i) / headDim)))
      const angle = Math.fround(pos * freq)
      const c = Math.cos(angle)
      const s = Math.sin(angle)
      const [j0, j1] = style === 'adjacent' ? [2 * i, 2 * i + 1] : [i, i + half]
      cos[pos * headDim + j0] = c
      cos[pos * headDim + j1] = c
      sin[pos * headDim + j0] = s
      sin[pos * headDim + j1] = s
    }
  }
  return { cos, sin }
}
