/**
 * Test helper: writes small GGUF v2/v3 files by hand (little-endian), so error paths and F16 / tied-embedding cases
 * can be tested without a real converter. Not a test file itself.
 */

/** One encoded metadata key/value (key string, u32 type, value). */
export type Kv = Uint8Array

/** A tensor to store: `dims` innermost first as GGUF lists them; `data` is stored verbatim. */
export interface FixtureTensor {
  readonly name: string
  readonly dims: readonly number[]
  readonly ggmlType: number
  readonly data: Uint8Array
}

class ByteWriter {
  readonly #parts: number[] = []
  u8(v: number): this {
    this.#parts.push(v & 0xff)
    return this
  }
  u32(v: number): this {
    const b = new Uint8Array(4)
    new DataView(b.buffer).setUint32(0, v, true)
    return this.bytes(b)
  }
  u64(v: number | bigint): this {
    const b = new Uint8Array(8)
    new DataView(b.buffer).setBigUint64(0, BigInt(v), true)
    return this.bytes(b)
  }
  f32(v: number): this {
    const b = new Uint8Array(4)
    new DataView(b.buffer).setFloat32(0, v, true)
    return this.bytes(b)
  }
  str(s: string): this {
    const b = new TextEncoder().encode(s)
    return this.u64(b.length).bytes(b)
  }
  bytes(b: Uint8Array): this {
    for (const x of b) this.#parts.push(x)
    return this
  }
  get length(): number {
    return this.#parts.length
  }
  done(): Uint8Array {
    return Uint8Array.from(this.#parts)
  }
}

export const kvU32 = (key: string, v: number): Kv => new ByteWriter().str(key).u32(4).u32(v).done()
export const kvF32 = (key: string, v: number): Kv => new ByteWriter().str(key).u32(6).f32(v).done()
export const kvU64 = (key: string, v: number): Kv => new ByteWriter().str(key).u32(10).u64(v).done()
export const kvString = (key: string, v: string): Kv => new ByteWriter().str(key).u32(8).str(v).done()
export const kvStrings = (key: string, v: readonly string[]): Kv => {
  const w = new ByteWriter().str(key).u32(9).u32(8).u64(v.length)
  for (const s of v) w.str(s)
  return w.done()
}
export const kvBool = (key: string, v: boolean): Kv => new ByteWriter().str(key).u32(7).u8(v ? 1 : 0).done()
export const kvI32s = (key: string, v: readonly number[]): Kv => {
  const w = new ByteWriter().str(key).u32(9).u32(5).u64(v.length)
  for (const x of v) w.u32(x >>> 0)
  return w.done()
}
export const kvF32s = (key: string, v: readonly number[]): Kv => {
  const w = new ByteWriter().str(key).u32(9).u32(6).u64(v.length)
  for (const x of v) w.f32(x)
  return w.done()
}
/** An array of arrays of u8 (nested arrays are legal GGUF). */
export const kvNestedU8 = (key: string, v: readonly (readonly number[])[]): Kv => {
  const w = new ByteWriter().str(key).u32(9).u32(9).u64(v.length)
  for (const inner of v) {
    w.u32(0).u64(inner.length)
    for (const x of inner) w.u8(x)
  }
  return w.done()
}

/** Encodes a whole GGUF file: header, metadata, tensor infos, padding, tensor data (each tensor aligned). */
export function buildGguf(options: {
  readonly kvs: readonly Kv[]
  readonly tensors: readonly FixtureTensor[]
  readonly version?: number
  readonly alignment?: number
}): Uint8Array {
  const alignment = options.alignment ?? 32
  const w = new ByteWriter().bytes(new TextEncoder().encode('GGUF')).u32(options.version ?? 3)
  w.u64(options.tensors.length).u64(options.kvs.length)
  for (const kv of options.kvs) w.bytes(kv)
  let rel = 0
  const offsets: number[] = []
  for (const t of options.tensors) {
    offsets.push(rel)
    rel = Math.ceil((rel + t.data.length) / alignment) * alignment
  }
  options.tensors.forEach((t, i) => {
    w.str(t.name).u32(t.dims.length)
    for (const d of t.dims) w.u64(d)
    w.u32(t.ggmlType).u64(offsets[i]!)
  })
  while (w.length % alignment !== 0) w.u8(0)
  const dataStart = w.length
  options.tensors.forEach((t, i) => {
    while (w.length < dataStart + offsets[i]!) w.u8(0)
    w.bytes(t.data)
  })
  return w.done()
}

/** Tiny llama config used by the fixtures: dim 4, hidden 6, 1 layer, 2 heads, 1 KV head (head size 2), vocab 3. */
export const TINY = { dim: 4, hiddenDim: 6, nLayers: 1, nHeads: 2, nKvHeads: 1, headDim: 2, vocab: 3 } as const

/** Metadata of the tiny llama model (architecture, sizes, a 3-token sentencepiece vocabulary). */
export function tinyLlamaKvs(overrides: { arch?: string; tokenizerModel?: string } = {}): Kv[] {
  return [
    kvString('general.architecture', overrides.arch ?? 'llama'),
    kvU32('llama.embedding_length', TINY.dim),
    kvU32('llama.feed_forward_length', TINY.hiddenDim),
    kvU32('llama.block_count', TINY.nLayers),
    kvU32('llama.attention.head_count', TINY.nHeads),
    kvU32('llama.attention.head_count_kv', TINY.nKvHeads),
    kvU32('llama.context_length', 16),
    kvF32('llama.attention.layer_norm_rms_epsilon', 1e-6),
    kvF32('llama.rope.freq_base', 500000),
    kvString('tokenizer.ggml.model', overrides.tokenizerModel ?? 'llama'),
    kvStrings('tokenizer.ggml.tokens', ['<unk>', '<s>', '</s>']),
    kvF32s('tokenizer.ggml.scores', [0, 0, 0]),
    kvU32('tokenizer.ggml.bos_token_id', 1),
    kvU32('tokenizer.ggml.eos_token_id', 2),
  ]
}

/**
 * Tensors of the tiny model with values `base + k` (k = element index) so every tensor is distinguishable.
 * `dtype` picks F32 (type 0) or F16 (type 1); `withOutput: false` leaves out `output.weight` (tied embeddings).
 */
export function tinyLlamaTensors(dtype: 'f32' | 'f16', withOutput = true): FixtureTensor[] {
  const { dim, hiddenDim, nHeads, nKvHeads, headDim, vocab } = TINY
  // [name, shape outermost first]
  const specs: [string, number[]][] = [
    ['token_embd.weight', [vocab, dim]],
    ['output_norm.weight', [dim]],
    ...(withOutput ? ([['output.weight', [vocab, dim]]] as [string, number[]][]) : []),
    ['blk.0.attn_norm.weight', [dim]],
    ['blk.0.attn_q.weight', [nHeads * headDim, dim]],
    ['blk.0.attn_k.weight', [nKvHeads * headDim, dim]],
    ['blk.0.attn_v.weight', [nKvHeads * headDim, dim]],
    ['blk.0.attn_output.weight', [dim, nHeads * headDim]],
    ['blk.0.ffn_norm.weight', [dim]],
    ['blk.0.ffn_gate.weight', [hiddenDim, dim]],
    ['blk.0.ffn_down.weight', [dim, hiddenDim]],
    ['blk.0.ffn_up.weight', [hiddenDim, dim]],
  ]
  return specs.map(([name, shape], t) => {
    const n = shape.reduce((a, b) => a * b, 1)
    const values = Array.from({ length: n }, (_, k) => t * 100 + k * 0.5)
    const data =
      dtype === 'f32'
        ? new Uint8Array(Float32Array.from(values).buffer)
        : new Uint8Array(Float16Array.from(values).buffer)
    return { name, dims: [...shape].reverse(), ggmlType: dtype === 'f32' ? 0 : 1, data }
  })
}

/** The values `tinyLlamaTensors` stores in tensor number `t` of `n` elements. */
export function tinyValues(t: number, n: number): number[] {
  return Array.from({ length: n }, (_, k) => t * 100 + k * 0.5)
}
