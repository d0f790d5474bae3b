import { GraphBuilder } from './onnx-builder.ts'

/**
 * ONNX graphs for one peer's share of a Llama decoder layer, after TPI-LLM / Megatron-LM tensor parallelism
 * (Shoeybi et al. 2019 §3; Li et al., TPI-LLM 2024 §3.1): the attention block owns whole KV heads and their query
 * heads and returns a partial sum of the output projection; the FFN block owns a range of SwiGLU columns and returns a
 * partial sum of the down projection. The partial sums are allreduced outside the graph.
 *
 * Weights are graph inputs (the caller owns the buffers, ORT reads them in place), so one session serves every layer
 * and weights can be streamed from disk. Linear weights are fed as stored, `[out, in]`, and applied with
 * `Gemm(transB=1)`.
 */

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
}

/**
 * Attention block graph.
 *
 * Inputs:
 * - `x` [seq, dim] f32: hidden state entering the layer (full width, replicated on every peer)
 * - `cos`, `sin` [seq, headDim] f32: RoPE tables for the positions of `x` (see {@link ropeTables})
 * - `mask` [seq, total] f32: additive causal mask (0 or -Infinity), total = past + seq
 * - `past_k`, `past_v` [kvHeads, past, headDim] f32: this peer's KV cache
 * - `attn_norm` [dim], `wq` [heads*headDim, dim], `wk` / `wv` [kvHeads*headDim, dim], `wo` [dim, heads*headDim] f32
 *
 * Outputs: `partial` [seq, dim] f32 (this peer's term of `attention(x) @ Wo^T`), `present_k` / `present_v`
 * [kvHeads, total, headDim] f32 (the KV cache with this step appended).
 */
export function buildAttentionBlock(shape: AttentionShardShape): Uint8Array {
  const { dim, headDim, heads, kvHeads, normEps, ropeStyle } = shape
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
  const normW = g.input('attn_norm', 'float32', [dim])
  const wq = g.input('wq', 'float32', [heads * headDim, dim])
  const wk = g.input('wk', 'float32', [kvHeads * headDim, dim])
  const wv = g.input('wv', 'float32', [kvHeads * headDim, dim])
  const wo = g.input('wo', 'float32', [dim, heads * headDim])

  const xn = rmsNorm(g, x, normW, normEps)
  // [seq, n*headDim] -> [n, seq, headDim]
  const headsFirst = (t: string, n: number): string =>
    g.op('Transpose', [g.op('Reshape', [t, g.i64('shape', [0, n, headDim])])], { perm: [1, 0, 2] })
  const q = rope(g, headsFirst(g.op('Gemm', [xn, wq], { transB: 1 }), heads), cos, sin, headDim, ropeStyle)
  const k = rope(g, headsFirst(g.op('Gemm', [xn, wk], { transB: 1 }), kvHeads), cos, sin, headDim, ropeStyle)
  const v = headsFirst(g.op('Gemm', [xn, wv], { transB: 1 }), kvHeads)
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
  const partial = g.op('Gemm', [ctxRows, wo], { transB: 1 }) // [seq, dim]

  g.output(partial, 'partial', 'float32', ['seq', dim])
  g.output(presentK, 'present_k', 'float32', [kvHeads, 'total', headDim])
  g.output(presentV, 'present_v', 'float32', [kvHeads, 'total', headDim])
  return g.toBytes()
}

/** Shape of one peer's FFN share. */
export interface FfnShardShape {
  readonly dim: number
  /** SwiGLU columns owned by this peer (≥ 1). */
  readonly columns: number
  readonly normEps: number
}

/**
 * SwiGLU FFN block graph: `partial = (silu(xn @ W1^T) * (xn @ W3^T)) @ W2^T`, xn = RMSNorm(h).
 *
 * Inputs: `h` [seq, dim] f32; `ffn_norm` [dim]; `w1` (gate) and `w3` (up) [columns, dim]; `w2` (down) [dim, columns].
 * Output: `partial` [seq, dim] f32.
 */
export function buildFfnBlock(shape: FfnShardShape): Uint8Array {
  const { dim, columns, normEps } = shape
  if (columns < 1) throw new RangeError(`cannot build FFN block with ${columns} columns: need at least 1`)
  const g = new GraphBuilder('edgeshard_ffn')
  const h = g.input('h', 'float32', ['seq', dim])
  const normW = g.input('ffn_norm', 'float32', [dim])
  const w1 = g.input('w1', 'float32', [columns, dim])
  const w3 = g.input('w3', 'float32', [columns, dim])
  const w2 = g.input('w2', 'float32', [dim, columns])
  const hn = rmsNorm(g, h, normW, normEps)
  const gate = g.op('Gemm', [hn, w1], { transB: 1 })
  const up = g.op('Gemm', [hn, w3], { transB: 1 })
  const act = g.op('Mul', [g.op('Mul', [gate, g.op('Sigmoid', [gate])]), up])
  g.output(g.op('Gemm', [act, w2], { transB: 1 }), 'partial', 'float32', ['seq', dim])
  return g.toBytes()
}

/** Shape of the master's output head. */
export interface OutputHeadShape {
  readonly dim: number
  readonly vocabSize: number
  readonly normEps: number
}

/**
 * Final RMSNorm and classifier (master only): `logits = RMSNorm(x) @ Wcls^T`.
 * Inputs: `x` [seq, dim] f32, `output_norm` [dim], `wcls` [vocab, dim]. Output: `logits` [seq, vocab] f32.
 */
export function buildOutputHead(shape: OutputHeadShape): Uint8Array {
  const { dim, vocabSize, normEps } = shape
  const g = new GraphBuilder('edgeshard_output_head')
  const x = g.input('x', 'float32', ['seq', dim])
  const normW = g.input('output_norm', 'float32', [dim])
  const wcls = g.input('wcls', 'float32', [vocabSize, dim])
  g.output(g.op('Gemm', [rmsNorm(g, x, normW, normEps), wcls], { transB: 1 }), 'logits', 'float32', ['seq', vocabSize])
  return g.toBytes()
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
