/**
 * Random-weight models of real shapes, planned as a GGUF file whose tensors are generated and encoded a chunk of rows
 * at a time while the writer streams them to disk: memory stays at one chunk whatever the model size.
 */
import { canonicalShapes } from '../formats/canonical-tensors.ts'
import {
  chooseTensorType,
  type GgufExport,
  type GgufExportType,
  ggufConfigMetadata,
  ggufLlamaVocabMetadata,
  LLAMA_FILE_TYPES,
} from '../formats/gguf-export.ts'
import { type GgufTensorSpec, type GgufWriteValue, gguf } from '../formats/gguf-writer.ts'
import { encodeFromF32 } from '../quant/dtype-codec.ts'
import { SYNTH_SHAPE_NAMES, SYNTH_SHAPES } from './synth-shapes.ts'
import { synthVocabulary } from './synth-vocabulary.ts'

/** Standard deviation of random weights and biases (GPT-2 / Llama init `initializer_range` 0.02). */
export const SYNTH_WEIGHT_STD = 0.02
/** Values per generated chunk (whole rows; about 4 MiB of f32). */
const CHUNK_VALUES = 1 << 20
/** Half-width of the uniform distribution with standard deviation SYNTH_WEIGHT_STD: std · √3. */
const HALF_WIDTH = SYNTH_WEIGHT_STD * Math.sqrt(3)

/** Options of `planSynthGguf`. */
export interface SynthOptions {
  readonly type: GgufExportType
  /** Any non-negative integer; the same seed gives the same file. */
  readonly seed: number
}

/**
 * Plans a GGUF file of the named shape (see `SYNTH_SHAPES`) with random weights:
 * - 2-D weights i.i.d. uniform on ±0.02·√3 (standard deviation 0.02, so activations stay O(1) over any depth),
 *   biases likewise, norm weights 1.0; types by llama.cpp's rule (`chooseTensorType`);
 * - each tensor has its own stream: xoshiro128** seeded by splitmix64 from (seed, FNV-1a of the tensor name), each
 *   32-bit output giving two 16-bit values. Bytes depend only on (shape, type, seed), not on chunking or order;
 * - tied shapes (Llama 3.2, Qwen2.5) store no `output.weight`;
 * - metadata as `planGgufExport` writes it, the vocabulary of `synthVocabulary(vocabSize)`, and
 *   `edgeshard.synth.shape` / `edgeshard.synth.seed`.
 * Errors: RangeError for an unknown shape name or a seed that is not a non-negative safe integer.
 */
export function planSynthGguf(shapeName: string, options: SynthOptions): GgufExport {
  const shape = SYNTH_SHAPES[shapeName]
  if (shape === undefined) {
    throw new RangeError(`unknown shape ${JSON.stringify(shapeName)}, expected one of ${SYNTH_SHAPE_NAMES.join(', ')}`)
  }
  if (!Number.isSafeInteger(options.seed) || options.seed < 0) {
    throw new RangeError(`seed ${options.seed} is not a non-negative integer`)
  }
  const { config } = shape
  const quantized = options.type === 'q8_0' || options.type === 'q4_0'
  const metadata: [string, GgufWriteValue][] = [
    ['general.architecture', config.arch],
    ['general.name', `synthetic ${shapeName}`],
    ['general.file_type', gguf.u32(LLAMA_FILE_TYPES[options.type])],
    ...(quantized ? ([['general.quantization_version', gguf.u32(2)]] as [string, GgufWriteValue][]) : []),
    ['edgeshard.synth.shape', shapeName],
    ['edgeshard.synth.seed', gguf.u64(options.seed)],
    ...ggufConfigMetadata(config),
    ...ggufLlamaVocabMetadata(synthVocabulary(config.vocabSize)),
  ]
  const notices: string[] = []
  const tensors: GgufTensorSpec[] = []
  for (const [name, dims] of canonicalShapes(config)) {
    if (name === 'output.weight' && shape.tiedEmbeddings) continue
    const { dtype, fallback } = chooseTensorType(name, dims, options.type)
    if (fallback !== undefined) notices.push(fallback)
    const isNorm = name.endsWith('_norm.weight')
    tensors.push({
      name,
      dtype,
      shape: dims,
      data: () => (isNorm ? constantRows(dims, 1, dtype) : randomRows(dims, dtype, tensorSeed(options.seed, name))),
    })
  }
  return { metadata, tensors, notices, hasTokenizer: true }
}

/** A tensor of one value, as `dtype` (norm weights; 1-D, so one chunk). */
function* constantRows(shape: readonly number[], value: number, dtype: GgufTensorSpec['dtype']): Generator<Uint8Array> {
  const n = shape.reduce((a, b) => a * b, 1)
  yield encodeFromF32(dtype, new Float32Array(n).fill(value))
}

/** Random values of `shape` (outermost first), generated and encoded a chunk of whole rows at a time. */
function* randomRows(shape: readonly number[], dtype: GgufTensorSpec['dtype'], seed: bigint): Generator<Uint8Array> {
  const inner = shape.at(-1)!
  const rows = shape.reduce((a, b) => a * b, 1) / inner
  const chunkRows = Math.max(1, Math.floor(CHUNK_VALUES / inner))
  const rng = new Xoshiro128(seed)
  const buf = new Float32Array(Math.min(rows, chunkRows) * inner) // [chunkRows, inner] f32, reused
  for (let row = 0; row < rows; row += chunkRows) {
    const n = Math.min(chunkRows, rows - row)
    const values = buf.subarray(0, n * inner)
    rng.fillUniform(values, HALF_WIDTH)
    // encodeFromF32('f32') returns a view of `buf`: the writer copies or writes it before asking for the next chunk.
    yield encodeFromF32(dtype, values)
  }
}

/** Per-tensor seed: splitmix64 of the user seed mixed with FNV-1a (64-bit) of the tensor name. */
function tensorSeed(seed: number, name: string): bigint {
  let h = 0xcbf29ce484222325n
  for (const byte of new TextEncoder().encode(name)) {
    h ^= BigInt(byte)
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn
  }
  return splitmix64(BigInt(seed) ^ h)
}

/** splitmix64 (Steele, Lea, Flood 2014): one step from state `x`, the usual seeder of xoshiro generators. */
function splitmix64(x: bigint): bigint {
  let z = (x + 0x9e3779b97f4a7c15n) & 0xffffffffffffffffn
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn
  return z ^ (z >> 31n)
}

/** xoshiro128** 1.1 (Blackman & Vigna, prng.di.unimi.it): 32-bit outputs from 128 bits of state. */
class Xoshiro128 {
  #s0: number
  #s1: number
  #s2: number
  #s3: number

  constructor(seed: bigint) {
    const a = splitmix64(seed)
    const b = splitmix64(a)
    this.#s0 = Number(a & 0xffffffffn) | 0
    this.#s1 = Number(a >> 32n) | 0
    this.#s2 = Number(b & 0xffffffffn) | 0
    this.#s3 = Number(b >> 32n) | 0
    if ((this.#s0 | this.#s1 | this.#s2 | this.#s3) === 0) this.#s0 = 1 // the all-zero state is a fixed point
  }

  /**
   * Fills `out` with values uniform on [−halfWidth, halfWidth): each 32-bit output gives two 16-bit halves,
   * value = (h + 0.5) / 65536 · 2·halfWidth − halfWidth.
   */
  fillUniform(out: Float32Array, halfWidth: number): void {
    let s0 = this.#s0
    let s1 = this.#s1
    let s2 = this.#s2
    let s3 = this.#s3
    const scale = (2 * halfWidth) / 65536
    const offset = -halfWidth + scale / 2
    const n = out.length
    for (let i = 0; i < n; i += 2) {
      // result = rotl(s1 * 5, 7) * 9
      const m = Math.imul(s1, 5)
      const r = Math.imul((m << 7) | (m >>> 25), 9)
      const t = s1 << 9
      s2 ^= s0
      s3 ^= s1
      s1 ^= s2
      s0 ^= s3
      s2 ^= t
      s3 = (s3 << 11) | (s3 >>> 21)
      out[i] = (r & 0xffff) * scale + offset
      if (i + 1 < n) out[i + 1] = (r >>> 16) * scale + offset
    }
    this.#s0 = s0
    this.#s1 = s1
    this.#s2 = s2
    this.#s3 = s3
  }
}
