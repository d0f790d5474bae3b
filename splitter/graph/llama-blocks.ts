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

/**
 * How a graph computes attention. 'gqa': ORT's `com.microsoft.GroupQueryAttention`, one op for RoPE, appending to the
 * KV cache, the grouped Q·Kᵀ, the causal softmax and the weighted sum of V; ORT's CPU kernel needs a head size that
 * is a multiple of 8, and rotates inside the op only for multiples of 16 (other sizes rotate Q and K with
 * `com.microsoft.RotaryEmbedding` first). 'ops': the same arithmetic in about 40 plain ONNX ops, for any head size.
 * The two agree to float rounding (test/splitter/graph/llama-blocks.test.ts); 'gqa' costs far fewer op dispatches.
 */
export type AttentionKernel = 'gqa' | 'ops'

/** The attention kernel graphs use for head size `headDim` (see {@link AttentionKernel}). */
export function attentionKernel(headDim: number): AttentionKernel {
  return headDim % 8 === 0 ? 'gqa' : 'ops'
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
  /** Attention kernel; default {@link attentionKernel}(headDim). 'gqa' needs a head size that is a multiple of 8. */
  readonly kernel?: AttentionKernel
}

/**
 * Attention block graph.
 *
 * Inputs:
 * - `x` [seq, dim] f32: hidden state entering the layer (full width, replicated on every peer)
 * - positions, by kernel (see {@link AttentionKernel}):
 *   - 'gqa': `seqlens_k` [1] int32 = past + seq − 1 (ORT's convention: the index of the last position),
 *     `total_sequence_length` [] int32 = past + seq, `cos_cache` / `sin_cache` [maxSeqLen, headDim/2] f32 (the
 *     whole table, see {@link ropeCaches}); `past_k`, `past_v` [1, kvHeads, capacity, headDim] f32: the KV cache in
 *     a buffer of any capacity ≥ past, positions 0..past-1 of each head first (the rest is not read)
 *   - 'ops': `cos`, `sin` [seq, headDim] f32 (rows of {@link ropeTables} for the positions of `x`), `mask`
 *     [seq, total] f32 (additive causal mask, 0 or -Infinity); `past_k`, `past_v` [kvHeads, past, headDim] f32
 * - `attn_norm` [dim] f32; linear weights `wq` [heads*headDim, dim], `wk` / `wv` [kvHeads*headDim, dim],
 *   `wo` [dim, heads*headDim], each dense or quantized per `shape.bits` (see `linear`); `bq`, `bk`, `bv` with qkvBias
 *
 * Outputs: `partial` [seq, dim] f32 (this peer's term of `attention(x) @ Wo^T`), and
 * - 'gqa': `new_k` / `new_v` [1, kvHeads, seq, headDim] f32, K (rotated) and V of this step's positions, for the caller
 *   to write into its cache at positions past..total-1. The whole cache never leaves onnxruntime: onnxruntime-node
 *   copies every output into a fresh, zero-filled ArrayBuffer, which for the cache cost two passes over it per layer
 *   and token, plus the garbage collections those buffers set off. Binding `present` to the caller's buffer as a
 *   pre-allocated output (GroupQueryAttention then shares past and present) does not avoid that: the binding still
 *   copies the whole capacity out. Measured on one GQA op (32 heads, 4 KV heads, head size 64, capacity 2048):
 *   0.26 / 0.79 / 1.33 ms per step at 100 / 1000 / 2000 positions this way, 2.95 / 4.42 / 4.80 ms bound.
 * - 'ops': `present_k` / `present_v` [kvHeads, total, headDim] f32, the cache with this step appended.
 * @throws RangeError when the heads do not group over the KV heads, the head size is odd, or 'gqa' is asked for a
 *   head size that is not a multiple of 8
 */
export function buildAttentionBlock(shape: AttentionShardShape, constants?: GraphConstants): Uint8Array {
  const g = new GraphBuilder('edgeshard_attention')
  const x = g.input('x', 'float32', ['seq', shape.dim])
  if ((shape.kernel ?? attentionKernel(shape.headDim)) === 'ops') {
    checkAttentionShape(shape, 'ops')
    const out = attentionOps(g, shape, constants, x)
    g.output(out.partial, 'partial', 'float32', ['seq', shape.dim])
    g.output(out.presentK, 'present_k', 'float32', [shape.kvHeads, 'total', shape.headDim])
    g.output(out.presentV, 'present_v', 'float32', [shape.kvHeads, 'total', shape.headDim])
    return g.toBytes()
  }
  checkAttentionShape(shape, 'gqa')
  const positions = positionInputs(g, shape.headDim, x)
  const pastK = g.input('past_k', 'float32', [1, shape.kvHeads, 'capacity', shape.headDim])
  const pastV = g.input('past_v', 'float32', [1, shape.kvHeads, 'capacity', shape.headDim])
  const xn = rmsNorm(g, x, param(g, constants, 'attn_norm', 'float32', [shape.dim]), shape.normEps)
  const out = attentionGqa(g, shape, constants, xn, positions, pastK, pastV)
  g.output(out.partial, 'partial', 'float32', ['seq', shape.dim])
  g.output(out.newK, 'new_k', 'float32', [1, shape.kvHeads, 'seq', shape.headDim])
  g.output(out.newV, 'new_v', 'float32', [1, shape.kvHeads, 'seq', shape.headDim])
  return g.toBytes()
}

function checkAttentionShape(shape: AttentionShardShape, kernel: AttentionKernel): void {
  const { headDim, heads, kvHeads } = shape
  if (kvHeads < 1 || heads % kvHeads !== 0) {
    throw new RangeError(`cannot build attention block: ${heads} query heads do not group over ${kvHeads} KV heads`)
  }
  if (headDim % 2 !== 0) throw new RangeError(`cannot build attention block: RoPE needs an even head size, got ${headDim}`)
  if (kernel === 'gqa' && headDim % 8 !== 0) {
    throw new RangeError(`cannot build attention block with GroupQueryAttention: head size ${headDim} is not a multiple of 8`)
  }
}

/** Position inputs of the 'gqa' kernel (see {@link buildAttentionBlock}), and the range of this step's positions. */
interface PositionInputs {
  readonly seqlensK: string
  readonly total: string
  readonly cosCache: string
  readonly sinCache: string
  /** [1] int64: past = total − seq, the first position of `x` */
  readonly first: string
  /** [1] int64: total */
  readonly end: string
}

/** Declares the position inputs; `x` [seq, dim] gives seq. */
function positionInputs(g: GraphBuilder, headDim: number, x: string): PositionInputs {
  const total = g.input('total_sequence_length', 'int32', [])
  const end = g.op('Unsqueeze', [g.op('Cast', [total], { to: 7 }), g.i64('axes', [0])])
  return {
    seqlensK: g.input('seqlens_k', 'int32', [1]),
    total,
    cosCache: g.input('cos_cache', 'float32', ['max_seq', headDim / 2]),
    sinCache: g.input('sin_cache', 'float32', ['max_seq', headDim / 2]),
    first: g.op('Sub', [end, g.op('Shape', [x], { start: 0, end: 1 })]),
    end,
  }
}

/**
 * Q, K and V projections of `xn` [seq, dim], biases added: one tensor [seq, (heads + 2·kvHeads)·headDim] (Q, K and V
 * side by side) when the weights are baked in one storage (a single matmul over [wq; wk; wv], rows stacked), else
 * three: [seq, heads·headDim], [seq, kvHeads·headDim] ×2.
 */
function projectQkv(g: GraphBuilder, shape: AttentionShardShape, constants: GraphConstants | undefined, xn: string): string[] {
  const { dim, headDim, heads, kvHeads, bits } = shape
  const names = ['wq', 'wk', 'wv'] as const
  const widths = qkvWidths(shape)
  const bias = (i: number): string => param(g, constants, ['bq', 'bk', 'bv'][i]!, 'float32', [widths[i]!])
  if (constants?.wq && constants.wk && constants.wv && bits.wq === bits.wk && bits.wq === bits.wv) {
    const qkvRows = (heads + 2 * kvHeads) * headDim
    const qkv = linear(g, concatRows(constants, 'wqkv', names, bits.wq), xn, 'wqkv', qkvRows, dim, bits.wq, shape)
    return [shape.qkvBias ? g.op('Add', [qkv, g.op('Concat', [bias(0), bias(1), bias(2)], { axis: 0 })]) : qkv]
  }
  return names.map((name, i) => {
    const y = linear(g, constants, xn, name, widths[i]!, dim, bits[name], shape)
    return shape.qkvBias ? g.op('Add', [y, bias(i)]) : y
  })
}

/** Widths of Q, K and V: heads·headDim, kvHeads·headDim, kvHeads·headDim. */
function qkvWidths(shape: AttentionShardShape): [number, number, number] {
  return [shape.heads * shape.headDim, shape.kvHeads * shape.headDim, shape.kvHeads * shape.headDim]
}

/** Q, K and V of {@link projectQkv}, split along the last axis when they come side by side. */
function splitQkv(g: GraphBuilder, shape: AttentionShardShape, qkv: readonly string[]): [string, string, string] {
  if (qkv.length === 3) return qkv as [string, string, string]
  return g.node('Split', [qkv[0]!, g.i64('split', qkvWidths(shape))], { attrs: { axis: -1 }, nOutputs: 3 }) as [string, string, string]
}

/**
 * The 'gqa' attention of `xn` [seq, dim] (already normalised) over the cache `pastK`/`pastV`: returns the partial
 * [seq, dim] and this step's K (rotated) and V, [1, kvHeads, seq, headDim].
 */
function attentionGqa(
  g: GraphBuilder,
  shape: AttentionShardShape,
  constants: GraphConstants | undefined,
  xn: string,
  positions: PositionInputs,
  pastK: string,
  pastV: string,
): { partial: string; newK: string; newV: string } {
  const { headDim, heads, kvHeads } = shape
  const interleaved = shape.ropeStyle === 'adjacent' ? 1 : 0
  const batch = (t: string): string => g.op('Unsqueeze', [t, g.i64('axes', [0])]) // [seq, n] -> [1, seq, n]
  const qkv = projectQkv(g, shape, constants, xn).map(batch)
  const attrs = { num_heads: heads, kv_num_heads: kvHeads }
  let outs: string[]
  if (headDim % 16 === 0) {
    // Q, K and V packed side by side go in as `query` alone.
    const { seqlensK, total, cosCache, sinCache } = positions
    outs = g.node('GroupQueryAttention', [...(qkv.length === 1 ? [qkv[0]!, '', ''] : qkv), pastK, pastV, seqlensK, total, cosCache, sinCache], {
      attrs: { ...attrs, do_rotary: 1, rotary_interleaved: interleaved },
      domain: 'com.microsoft',
      nOutputs: 3,
    })
  } else {
    // RotaryEmbedding with one position id p rotates the rows as positions p, p+1, ...: p = total − seq.
    const [q, k, v] = splitQkv(g, shape, qkv)
    const rotate = (t: string, n: number): string =>
      g.node('RotaryEmbedding', [t, positions.first, positions.cosCache, positions.sinCache], {
        attrs: { interleaved, num_heads: n },
        domain: 'com.microsoft',
      })[0]!
    outs = g.node('GroupQueryAttention', [rotate(q, heads), rotate(k, kvHeads), v, pastK, pastV, positions.seqlensK, positions.total], {
      attrs,
      domain: 'com.microsoft',
      nOutputs: 3,
    })
  }
  // ctx [1, seq, heads*headDim]; present [1, kvHeads, max(total, capacity), headDim], this step at rows past..total-1
  const [ctx, presentK, presentV] = outs as [string, string, string]
  const ctxRows = g.op('Reshape', [ctx, g.i64('shape', [-1, heads * headDim])]) // [seq, heads*headDim]
  const rows = (present: string): string => g.op('Slice', [present, positions.first, positions.end, g.i64('axes', [2])])
  return {
    partial: linear(g, constants, ctxRows, 'wo', shape.dim, heads * headDim, shape.bits.wo, shape),
    newK: rows(presentK),
    newV: rows(presentV),
  }
}

/** The 'ops' attention of `x` [seq, dim]: declares its own inputs (see {@link buildAttentionBlock}). */
function attentionOps(g: GraphBuilder, shape: AttentionShardShape, constants: GraphConstants | undefined, x: string): { partial: string; presentK: string; presentV: string } {
  const { dim, headDim, heads, kvHeads, normEps, ropeStyle } = shape
  const cos = g.input('cos', 'float32', ['seq', headDim])
  const sin = g.input('sin', 'float32', ['seq', headDim])
  const mask = g.input('mask', 'float32', ['seq', 'total'])
  const pastK = g.input('past_k', 'float32', [kvHeads, 'past', headDim])
  const pastV = g.input('past_v', 'float32', [kvHeads, 'past', headDim])
  const normW = param(g, constants, 'attn_norm', 'float32', [dim])

  const xn = rmsNorm(g, x, normW, normEps)
  const [qRows, kRows, vRows] = splitQkv(g, shape, projectQkv(g, shape, constants, xn))
  // [seq, n*headDim] -> [n, seq, headDim]
  const headsFirst = (t: string, n: number): string =>
    g.op('Transpose', [g.op('Reshape', [t, g.i64('shape', [0, n, headDim])])], { perm: [1, 0, 2] })
  const q = rope(g, headsFirst(qRows, heads), cos, sin, headDim, ropeStyle)
  const k = rope(g, headsFirst(kRows, kvHeads), cos, sin, headDim, ropeStyle)
  const v = headsFirst(vRows, kvHeads)
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
  const partial = linear(g, constants, ctxRows, 'wo', dim, heads * headDim, shape.bits.wo, shape) // [seq, dim]
  return { partial, presentK, presentV }
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

/**
 * Whole decoder layers in one graph, for a peer that holds every head and FFN column of them and so has no
 * allreduce partner (a single device, or a pipeline stage of one device): per layer `x += attention(RMSNorm(x))`,
 * `x += ffn(RMSNorm(x))`, each residual add fused into the RMSNorm that follows it
 * (`com.microsoft.SkipSimplifiedLayerNormalization`). One session run covers `layers.length` layers, against two
 * runs and two host-side adds per layer with {@link buildAttentionBlock} and {@link buildFfnBlock}; the arithmetic
 * is theirs (f32 adds in the same order).
 *
 * Inputs: `x` [seq, dim] f32; the position inputs of the 'gqa' kernel (see {@link buildAttentionBlock});
 * `past_k_<i>`, `past_v_<i>` [1, kvHeads, capacity, headDim] f32, the KV cache of the i-th layer of the graph (from 0)
 * as there. Outputs: `y` [seq, dim] f32 (the hidden state after the last layer), `new_k_<i>`, `new_v_<i>`
 * [1, kvHeads, seq, headDim] f32, this step's K and V of each layer.
 * @param layers per layer, every weight of its attention and FFN blocks (names as in those blocks), all baked
 * @throws RangeError when a weight is missing, the shapes do not describe whole layers, or the head size does not
 *   suit the 'gqa' kernel
 */
export function buildDecoderLayers(attention: AttentionShardShape, ffn: FfnShardShape, layers: readonly GraphConstants[]): Uint8Array {
  const { dim, headDim, kvHeads, normEps } = attention
  checkAttentionShape(attention, 'gqa')
  if (ffn.dim !== dim || ffn.normEps !== normEps) throw new RangeError(`cannot build decoder layers: attention width ${dim} and FFN width ${ffn.dim} differ`)
  if (layers.length < 1) throw new RangeError('cannot build decoder layers: no layers given')
  const g = new GraphBuilder('edgeshard_layers')
  let x = g.input('x', 'float32', ['seq', dim])
  const positions = positionInputs(g, headDim, x)
  let pending: string | null = null // the last FFN output, still to be added to x
  for (const [i, c] of layers.entries()) {
    const missing = ['attn_norm', 'wq', 'wk', 'wv', 'wo', 'ffn_norm', 'w1', 'w3', 'w2'].filter((n) => !c[n])
    if (missing.length > 0) throw new RangeError(`cannot build decoder layers: layer ${i} lacks weights ${missing.join(', ')}`)
    const pastK = g.input(`past_k_${i}`, 'float32', [1, kvHeads, 'capacity', headDim])
    const pastV = g.input(`past_v_${i}`, 'float32', [1, kvHeads, 'capacity', headDim])
    const attnNorm = param(g, c, 'attn_norm', 'float32', [dim])
    let xn: string
    if (pending) [xn, x] = addRmsNorm(g, x, pending, attnNorm, normEps)
    else xn = rmsNorm(g, x, attnNorm, normEps)
    const a = attentionGqa(g, attention, c, xn, positions, pastK, pastV)
    g.output(a.newK, `new_k_${i}`, 'float32', [1, kvHeads, 'seq', headDim])
    g.output(a.newV, `new_v_${i}`, 'float32', [1, kvHeads, 'seq', headDim])
    const [hn, h] = addRmsNorm(g, x, a.partial, param(g, c, 'ffn_norm', 'float32', [dim]), normEps)
    x = h
    pending = swiGlu(g, ffn, c, hn)
  }
  g.output(g.op('Add', [x, pending!]), 'y', 'float32', ['seq', dim])
  return g.toBytes()
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
  const { dim, columns, normEps } = shape
  if (columns < 1) throw new RangeError(`cannot build FFN block with ${columns} columns: need at least 1`)
  const g = new GraphBuilder('edgeshard_ffn')
  const h = g.input('h', 'float32', ['seq', dim])
  const hn = rmsNorm(g, h, param(g, constants, 'ffn_norm', 'float32', [dim]), normEps)
  g.output(swiGlu(g, shape, constants, hn), 'partial', 'float32', ['seq', dim])
  return g.toBytes()
}

/**
 * `(silu(hn @ W1^T) * (hn @ W3^T)) @ W2^T` of `hn` [seq, dim] → [seq, dim]. Baked W1 and W3 of one storage run as a
 * single matmul over [W1; W3] (rows stacked), split into gate and up.
 */
function swiGlu(g: GraphBuilder, shape: FfnShardShape, constants: GraphConstants | undefined, hn: string): string {
  const { dim, columns, bits } = shape
  let gate: string
  let up: string
  if (constants?.w1 && constants.w3 && bits.w1 === bits.w3) {
    const w13 = linear(g, concatRows(constants, 'w13', ['w1', 'w3'], bits.w1), hn, 'w13', 2 * columns, dim, bits.w1, shape)
    ;[gate, up] = g.node('Split', [w13, g.i64('split', [columns, columns])], { attrs: { axis: -1 }, nOutputs: 2 }) as [string, string]
  } else {
    gate = linear(g, constants, hn, 'w1', columns, dim, bits.w1, shape)
    up = linear(g, constants, hn, 'w3', columns, dim, bits.w3, shape)
  }
  const act = g.op('Mul', [g.op('Mul', [gate, g.op('Sigmoid', [gate])]), up])
  return linear(g, constants, act, 'w2', dim, columns, bits.w2, shape)
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

/**
 * RMSNorm over the last axis (Zhang & Sennrich 2019): `w * x / sqrt(mean(x²) + eps)`, as llama2.c's rmsnorm, in one
 * op: `SimplifiedLayerNormalization` (ONNX domain, registered by onnxruntime as a contrib op since opset 1; the seven
 * ops it replaces cost more in dispatch than in arithmetic at decode sizes).
 */
function rmsNorm(g: GraphBuilder, x: string, weight: string, eps: number): string {
  return g.node('SimplifiedLayerNormalization', [x, weight], { attrs: { axis: -1, epsilon: eps, stash_type: 1 }, floatAttrs: ['epsilon'] })[0]!
}

/**
 * `x + skip` and its RMSNorm (see {@link rmsNorm}) in one op: `com.microsoft.SkipSimplifiedLayerNormalization`.
 * @returns [normalised sum, sum]
 */
function addRmsNorm(g: GraphBuilder, x: string, skip: string, weight: string, eps: number): [string, string] {
  const outs = g.node('SkipSimplifiedLayerNormalization', [x, skip, weight], { attrs: { epsilon: eps }, floatAttrs: ['epsilon'], domain: 'com.microsoft', nOutputs: 4 })
  return [outs[0]!, outs[3]!]
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
 * RoPE angle of pair i at position pos, `pos * theta^(-2i/headDim)`, with llama2.c run.c's float arithmetic
 * (`freq = 1 / pow(10000, head_dim / head_size)`, freq and angle in f32).
 */
function ropeAngle(pos: number, i: number, headDim: number, theta: number): number {
  const freq = Math.fround(1 / Math.fround(theta ** Math.fround((2 * i) / headDim)))
  return Math.fround(pos * freq)
}

/**
 * RoPE tables for positions 0..maxSeqLen-1 of the 'ops' attention kernel: `cos`/`sin` [maxSeqLen, headDim] f32 with
 * the angle of each pair (see `ropeAngle`) repeated over the pair's two slots (layout per `style`). Rows for
 * positions p..p+s are a zero-copy `subarray`.
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
      const angle = ropeAngle(pos, i, headDim, theta)
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

/**
 * RoPE caches of the 'gqa' attention kernel, ORT's layout for GroupQueryAttention and RotaryEmbedding: `cos`/`sin`
 * [maxSeqLen, headDim/2] f32, one value per pair (the op pairs dimensions by its `interleaved` attribute). The values
 * are those of {@link ropeTables}.
 */
export function ropeCaches(maxSeqLen: number, headDim: number, theta: number): { cos: Float32Array; sin: Float32Array } {
  const half = headDim / 2
  const cos = new Float32Array(maxSeqLen * half)
  const sin = new Float32Array(maxSeqLen * half)
  for (let pos = 0; pos < maxSeqLen; pos++) {
    for (let i = 0; i < half; i++) {
      const angle = ropeAngle(pos, i, headDim, theta)
      cos[pos * half + i] = Math.cos(angle)
      sin[pos * half + i] = Math.sin(angle)
    }
  }
  return { cos, sin }
}
