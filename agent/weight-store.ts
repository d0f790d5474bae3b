import { createHash } from 'node:crypto'
import { type FileHandle, mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { crc32 } from 'node:zlib'
import { logger } from '@libp2p/logger'
import {
  type AttentionShardWeights,
  blockwiseBytes,
  blockwiseView,
  type FfnShardWeights,
  type LayerShardWeights,
  nbitsToBlockwise,
  type StreamedLinearWeight,
  type WeightBits,
} from '../splitter/index.ts'
import { BlockLoader, type LoadResult } from './block-loader.ts'
import type { WeightName } from './protocol.ts'

const log = logger('edgeshard:agent:weights')

/** The two half-layer blocks of TPI-LLM's sliding window (§3.3): attention, then FFN. */
export type BlockKind = 'attention' | 'ffn'

/** How a peer's blocks are stored, for building its graphs (the same in every layer). */
export interface BlockLayout {
  readonly attention: { readonly wq: WeightBits; readonly wk: WeightBits; readonly wv: WeightBits; readonly wo: WeightBits } | null
  readonly ffn: { readonly w1: WeightBits; readonly w3: WeightBits; readonly w2: WeightBits } | null
}

/**
 * Where a shard runner gets each layer's weights. Blocks are acquired in execution order (layer 0 attention, layer 0
 * FFN, layer 1 attention, …, then layer 0 again for the next token) and released as soon as their graph has run.
 */
export interface WeightStore {
  readonly layout: BlockLayout
  attention(layer: number): Promise<AttentionShardWeights<StreamedLinearWeight>>
  ffn(layer: number): Promise<FfnShardWeights<StreamedLinearWeight>>
  release(layer: number, kind: BlockKind): void
  /** Milliseconds spent waiting for blocks that were not loaded yet. */
  readonly ioWaitMs: number
  /** Blocks resident at most (the window W). */
  readonly window: number
  close(): Promise<void>
}

function layoutOf(w: LayerShardWeights | undefined): BlockLayout {
  const a = w?.attention
  const f = w?.ffn
  return {
    attention: a ? { wq: a.wq.bits, wk: a.wk.bits, wv: a.wv.bits, wo: a.wo.bits } : null,
    ffn: f ? { w1: f.w1.bits, w3: f.w3.bits, w2: f.w2.bits } : null,
  }
}

/** Every block in memory (resident mode): acquire and release cost nothing. */
export class ResidentStore implements WeightStore {
  readonly layout: BlockLayout
  readonly ioWaitMs = 0
  readonly window: number
  readonly #weights: readonly LayerShardWeights[]

  constructor(weights: readonly LayerShardWeights[]) {
    this.#weights = weights
    // A pipeline stage holds only its own layers: the others are empty.
    const held = weights.filter((w) => w.attention !== null || w.ffn !== null)
    this.layout = layoutOf(held[0])
    this.window = held.length * 2
  }

  async attention(layer: number): Promise<AttentionShardWeights> {
    return this.#weights[layer]!.attention!
  }

  async ffn(layer: number): Promise<FfnShardWeights> {
    return this.#weights[layer]!.ffn!
  }

  release(): void {}

  async close(): Promise<void> {}
}

/** One tensor inside a block of a shard file. */
interface TensorEntry {
  readonly name: WeightName
  readonly bits: 32 | 8 | 4
  readonly rows: number
  readonly cols: number
  /** Byte offset inside the block (8-byte aligned). */
  readonly offset: number
  /** 'blockwise': a 4/8-bit weight laid out for streaming (splitter/quant/blockwise.ts); default MatMulNBits. */
  readonly layout?: 'blockwise'
}

/** One half-layer block of a shard file. */
interface BlockEntry {
  readonly layer: number
  readonly kind: BlockKind
  /** Byte offset of the block in blocks.bin (64-byte aligned). */
  readonly offset: number
  readonly bytes: number
  /** sha256 of the block's bytes, hex. */
  readonly sha256: string
  /** CRC-32 (zlib's) of the block's bytes, checked on every read of the sliding window (absent in older indexes). */
  readonly crc32?: number
  readonly tensors: readonly TensorEntry[]
}

/** index.json of a shard directory. */
interface ShardIndex {
  readonly version: 1
  readonly layers: number
  readonly blocks: readonly BlockEntry[]
  /** For a streaming copy (see {@link prepareBlockwise}): the digest of the shard it was made from. */
  readonly source?: string
}

const ATTENTION_NAMES: ReadonlySet<WeightName> = new Set(['attn_norm', 'wq', 'wk', 'wv', 'wo', 'bq', 'bk', 'bv'])

/** A shard file failed its checksum or does not match what was expected. */
export class ShardFileError extends Error {
  static override name = 'ShardFileError'
  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'ShardFileError'
  }
}

/** The memory budget cannot hold two blocks plus the KV cache. */
export class MemoryBudgetError extends Error {
  static override name = 'MemoryBudgetError'
  /** Bytes the budget would need at least. */
  readonly neededBytes: number
  constructor(message: string, neededBytes: number) {
    super(message)
    this.name = 'MemoryBudgetError'
    this.neededBytes = neededBytes
  }
}

const align = (n: number, to: number): number => Math.ceil(n / to) * to

/**
 * Writes a peer's shard to a directory as it arrives, one tensor at a time (nothing is held in memory): `blocks.bin`
 * holds the half-layer blocks back to back (64-byte aligned; tensors inside 8-byte aligned, in the layout of
 * `tensor` frames), `index.json` their offsets, shapes and sha256. Tensors must arrive block by block in execution
 * order, as the master sends them.
 */
export class ShardFileWriter {
  readonly dir: string
  readonly #file: FileHandle
  readonly #blocks: BlockEntry[] = []
  #current: { layer: number; kind: BlockKind; offset: number; bytes: number; hash: ReturnType<typeof createHash>; crc: number; tensors: TensorEntry[] } | null = null
  #end = 0
  #layers = 0

  private constructor(dir: string, file: FileHandle) {
    this.dir = dir
    this.#file = file
  }

  static async create(dir: string): Promise<ShardFileWriter> {
    await rm(dir, { recursive: true, force: true })
    await mkdir(dir, { recursive: true })
    return new ShardFileWriter(dir, await open(join(dir, 'blocks.bin'), 'w'))
  }

  /** Appends one tensor (a `tensor` frame body, or with `layout` 'blockwise' a weight laid out for streaming). */
  async add(layer: number, name: WeightName, bits: 32 | 8 | 4, rows: number, cols: number, body: Uint8Array, layout?: 'blockwise'): Promise<void> {
    const kind: BlockKind = ATTENTION_NAMES.has(name) ? 'attention' : 'ffn'
    if (!this.#current || this.#current.layer !== layer || this.#current.kind !== kind) {
      this.#finishBlock()
      this.#end = align(this.#end, 64)
      this.#current = { layer, kind, offset: this.#end, bytes: 0, hash: createHash('sha256'), crc: 0, tensors: [] }
      this.#layers = Math.max(this.#layers, layer + 1)
    }
    const block = this.#current
    const pad = align(block.bytes, 8) - block.bytes
    if (pad > 0) {
      const zeros = new Uint8Array(pad)
      block.hash.update(zeros)
      block.crc = crc32(zeros, block.crc)
      await this.#file.write(zeros, 0, pad, block.offset + block.bytes)
      block.bytes += pad
    }
    block.tensors.push({ name, bits, rows, cols, offset: block.bytes, ...(layout ? { layout } : {}) })
    block.hash.update(body)
    block.crc = crc32(body, block.crc)
    await this.#file.write(body, 0, body.byteLength, block.offset + block.bytes)
    block.bytes += body.byteLength
    this.#end = block.offset + block.bytes
  }

  #finishBlock(): void {
    const b = this.#current
    if (!b) return
    this.#blocks.push({ layer: b.layer, kind: b.kind, offset: b.offset, bytes: b.bytes, sha256: b.hash.digest('hex'), crc32: b.crc, tensors: b.tensors })
    this.#current = null
  }

  /** Flushes and writes index.json (with `source`, see {@link ShardIndex}); returns the total bytes of the shard. */
  async finish(source?: string): Promise<number> {
    this.#finishBlock()
    await this.#file.sync()
    await this.#file.close()
    const index: ShardIndex = { version: 1, layers: this.#layers, blocks: this.#blocks, ...(source ? { source } : {}) }
    await writeFile(join(this.dir, 'index.json.tmp'), JSON.stringify(index))
    await rename(join(this.dir, 'index.json.tmp'), join(this.dir, 'index.json'))
    return this.#end
  }
}

/** Options of {@link StreamingStore.open}. */
export interface StreamingOptions {
  /** Bytes for weights and KV cache (the runtime's own overhead comes on top). */
  readonly budgetBytes: number
  /** KV cache bytes at the full context (they share the budget). */
  readonly kvCacheBytes: number
  /** Check every block's sha256 once at open (default true). */
  readonly verify?: boolean
  /** How quantized weights' activations are treated (the plan's; default 'exact'): sets the kernels' workspace. */
  readonly quantizedMatmul?: 'exact' | 'int8'
  /**
   * Check every block's CRC-32 each time the sliding window reads it from disk (default true): corruption on disk
   * after the open is named instead of computed with. Costs ≈ 0.3–0.5 ms of CPU per MB read here (zlib crc32 ≈ 2–3.5
   * GB/s), on the loader's thread (agent/block-loader.ts), not the agent's event loop.
   */
  readonly checkReads?: boolean
}

/**
 * Bytes the int8 kernel of streamed quantized weights may use for one linear's [in/32, rows, out] int32
 * intermediate (splitter/graph/llama-blocks.ts 'blockwise-int8'); sets how many rows one graph run takes.
 */
export const STREAMED_INTERMEDIATE_BYTES = 4 * 2 ** 20

/** A stored tensor as the memory budget sees it. */
export interface TensorShape {
  readonly bits: 32 | 8 | 4
  readonly rows: number
  readonly cols: number
  readonly layout?: 'blockwise'
}

/** What streaming a shard through a window of blocks needs besides the blocks' count, bytes. */
export interface StreamingNeeds {
  /** The largest block as a window slot holds it (quantized weights blockwise: one byte per weight). */
  readonly largestBlockBytes: number
  /** Working memory of the graphs that apply streamed blocks (see below). */
  readonly workspaceBytes: number
  /** The KV cache at the full context. */
  readonly kvCacheBytes: number
  /** The least budget that streams: 2 blocks + KV cache + workspace. */
  readonly neededBytes: number
  /** Whether quantized weights are streamed (blockwise). */
  readonly quantized: boolean
}

/**
 * What a share whose blocks hold `blocks` needs to stream through a window (TPI-LLM §3.3), the single rule the agents
 * apply (StreamingStore.open) and the master checks before start (agent/plan-fit.ts). The kernels' working memory is
 * charged to the budget: the int8 kernel of quantized weights holds about four tensors of
 * {@link STREAMED_INTERMEDIATE_BYTES} at once (int32 products, their f32 cast, two scalings); the exact kernel expands
 * the largest weight to f32 (cast, offset, scaled: up to four f32 copies of it are live in onnxruntime's allocator,
 * measured on a 1M-weight FFN). Dense weights need none beyond the runtime's own.
 */
export function streamingNeeds(blocks: readonly (readonly TensorShape[])[], kvCacheBytes: number, quantizedMatmul: 'exact' | 'int8'): StreamingNeeds {
  const all = blocks.flat()
  const quantized = all.filter((t) => t.bits !== 32)
  const largestBlockBytes = Math.max(0, ...blocks.map(streamedBlockBytes))
  const workspaceBytes =
    quantized.length === 0 ? 0 : quantizedMatmul === 'int8' ? 4 * STREAMED_INTERMEDIATE_BYTES : 4 * 4 * Math.max(...quantized.map((t) => t.rows * t.cols))
  return { largestBlockBytes, workspaceBytes, kvCacheBytes, neededBytes: 2 * largestBlockBytes + kvCacheBytes + workspaceBytes, quantized: quantized.length > 0 }
}

/** `needs` as the parts of a budget message: `2 blocks of B + KV cache K[ + kernel workspace W]`. */
export function describeStreamingNeeds(needs: StreamingNeeds, kvNote = ''): string {
  const parts = [`2 blocks of ${needs.largestBlockBytes}${needs.quantized ? ' as streamed, one byte per quantized weight' : ''}`, `KV cache ${needs.kvCacheBytes}${kvNote}`]
  if (needs.workspaceBytes > 0) parts.push(`kernel workspace ${needs.workspaceBytes}`)
  return parts.join(' + ')
}

/**
 * TPI-LLM's sliding-window memory scheduler (§3.3): at most W half-layer blocks resident in a pool of W reused
 * buffers; a loader thread (agent/block-loader.ts) reads the next blocks from the shard file and checks them while the
 * current one computes and allreduces, and wraps around to layer 0 for the next token. ORT reads the pool buffers
 * (SharedArrayBuffers) in place (weights are graph inputs). W = ⌊(budget − KV cache) / largest block⌋, at least 2.
 */
export class StreamingStore implements WeightStore {
  readonly layout: BlockLayout
  readonly window: number
  ioWaitMs = 0
  readonly #loader: BlockLoader
  /** The shard directory and its index (named in errors). */
  readonly #dir: string
  readonly #index: ShardIndex
  readonly #blocks: readonly BlockEntry[]
  readonly #order = new Map<string, number>()
  readonly #free: number[]
  /** CRC-32 each block must have when read, by block (from the index, or computed at open), or null: unchecked. */
  readonly #crcs: readonly (number | null)[] | null
  readonly #loading = new Map<number, { slot: number; ready: Promise<LayerBlock> }>()
  #next = 0
  #closed = false

  private constructor(loader: BlockLoader, dir: string, index: ShardIndex, window: number, layout: BlockLayout, crcs: readonly (number | null)[] | null) {
    this.#loader = loader
    this.#crcs = crcs
    this.#dir = dir
    this.#index = index
    this.#blocks = index.blocks
    for (const [i, b] of index.blocks.entries()) this.#order.set(`${b.layer}:${b.kind}`, i)
    this.window = window
    this.#free = this.#loader.slots.map((_, i) => i)
    this.layout = layout
  }

  /**
   * Opens a shard directory written by {@link ShardFileWriter}.
   * @throws MemoryBudgetError naming the bytes needed when the budget cannot hold 2 blocks plus the KV cache;
   *   ShardFileError naming the block when a checksum fails.
   */
  static async open(shardDir: string, options: StreamingOptions): Promise<StreamingStore> {
    let dir = shardDir
    let index = await readIndex(dir)
    // Quantized blocks stream in the blockwise layout (one byte per value): the budget must hold those.
    const needs = streamingNeeds(
      index.blocks.map((b) => b.tensors),
      options.kvCacheBytes,
      options.quantizedMatmul ?? 'exact',
    )
    if (options.budgetBytes < needs.neededBytes) {
      throw new MemoryBudgetError(
        `memory budget of ${options.budgetBytes} bytes is too small: needs ${needs.neededBytes} (${describeStreamingNeeds(needs)})`,
        needs.neededBytes,
      )
    }
    const largest = needs.largestBlockBytes
    const workspace = needs.workspaceBytes
    // A blockwise copy made just now was converted from verified blocks and hashed as written: not read back again.
    let verify = options.verify ?? true
    if (needs.quantized) {
      const copy = await prepareBlockwise(shardDir, index, verify)
      dir = copy.dir
      index = await readIndex(dir)
      if (copy.made) verify = false
    }
    const window = Math.min(index.blocks.length, Math.floor((options.budgetBytes - options.kvCacheBytes - workspace) / largest))
    const check = options.checkReads ?? true
    const crcs: (number | null)[] = index.blocks.map((b) => (check && b.crc32 !== undefined ? b.crc32 : null))
    if (verify) {
      const file = await open(join(dir, 'blocks.bin'), 'r')
      const buffer = new Uint8Array(largest)
      try {
        for (let i = 0; i < index.blocks.length; i++) {
          await readBlock(file, dir, index, i, buffer, true)
          // An index without CRCs (an older shard file): take them from the bytes the sha256 just vouched for.
          if (check && crcs[i] === null) crcs[i] = crc32(buffer.subarray(0, index.blocks[i]!.bytes))
        }
      } finally {
        await file.close()
      }
    }
    const layout = layoutFromIndex(index)
    log('streaming %d blocks from %s with a window of %d × %d bytes', index.blocks.length, dir, window, largest)
    const loader = await BlockLoader.start(join(dir, 'blocks.bin'), window, align(largest, 64))
    return new StreamingStore(loader, dir, index, window, layout, check ? crcs : null)
  }

  async attention(layer: number): Promise<AttentionShardWeights<StreamedLinearWeight>> {
    return (await this.#acquire(layer, 'attention')).attention!
  }

  async ffn(layer: number): Promise<FfnShardWeights<StreamedLinearWeight>> {
    return (await this.#acquire(layer, 'ffn')).ffn!
  }

  async #acquire(layer: number, kind: BlockKind): Promise<LayerBlock> {
    const i = this.#order.get(`${layer}:${kind}`)
    if (i === undefined) throw new RangeError(`no ${kind} block for layer ${layer} in this shard`)
    if (!this.#loading.has(i)) {
      // Out of the expected order (first token, or after an error): restart the loader here.
      for (const [j, entry] of this.#loading) {
        await entry.ready.catch(() => {})
        this.#free.push(entry.slot)
        this.#loading.delete(j)
      }
      this.#next = i
      this.#pump()
    }
    const t0 = performance.now()
    const block = await this.#loading.get(i)!.ready
    this.ioWaitMs += performance.now() - t0
    return block
  }

  release(layer: number, kind: BlockKind): void {
    const i = this.#order.get(`${layer}:${kind}`)
    const entry = i === undefined ? undefined : this.#loading.get(i)
    if (i === undefined || !entry) return
    this.#loading.delete(i)
    this.#free.push(entry.slot)
    this.#pump()
  }

  /** Starts loads of the next blocks in execution order while slots are free. */
  #pump(): void {
    while (!this.#closed && this.#free.length > 0 && !this.#loading.has(this.#next)) {
      const i = this.#next
      const slot = this.#free.shift()!
      const ready = this.#load(i, slot)
      ready.catch(() => {}) // surfaced to the acquirer
      this.#loading.set(i, { slot, ready })
      this.#next = (i + 1) % this.#blocks.length
    }
  }

  async #load(i: number, slot: number): Promise<LayerBlock> {
    const b = this.#blocks[i]!
    const bytes = new Uint8Array(this.#loader.slots[slot]!, 0, b.bytes)
    // sha256 of every block at open; each read here its CRC-32 (4× cheaper than sha256, still catches any flipped bit
    // or burst up to 32 bits): the file may be damaged after the open, and a bad block must not be computed with.
    // Read and checksum run on the loader's thread (see block-loader.ts).
    const expected = this.#crcs?.[i] ?? null
    for (let attempt = 1; ; attempt++) {
      let read: LoadResult
      try {
        read = await this.#loader.load(slot, b.offset, b.bytes, expected !== null)
      } catch (err) {
        throw new ShardFileError(`${blockName(this.#dir, this.#index, i)}: ${(err as Error).message}`, { cause: err })
      }
      checkWholeBlock(this.#dir, this.#index, i, read.bytesRead)
      if (expected === null) break
      const actual = read.crc!
      if (actual === expected) break
      // One more read first: a transient read error is not corruption.
      if (attempt === 2) {
        throw new ShardFileError(
          `${blockName(this.#dir, this.#index, i)} fails its crc32 check on read (index.json says ${hex32(expected)}, the file has ${hex32(actual)}): corrupted on disk after the shard was opened`,
        )
      }
      log.error('%s: crc32 mismatch on read, reading it again', blockName(this.#dir, this.#index, i))
    }
    return blockWeights(b, bytes)
  }

  async close(): Promise<void> {
    this.#closed = true
    await Promise.all([...this.#loading.values()].map((e) => e.ready.catch(() => {})))
    this.#loading.clear()
    await this.#loader.close()
  }
}

type LayerBlock = { attention?: AttentionShardWeights<StreamedLinearWeight>; ffn?: FfnShardWeights<StreamedLinearWeight> }

/** Views of one block's tensors on `bytes` (no copy). */
function blockWeights(b: BlockEntry, bytes: Uint8Array): LayerBlock {
  const t: Partial<Record<WeightName, StreamedLinearWeight>> = {}
  for (const e of b.tensors) {
    const at = bytes.byteOffset + e.offset
    const n = e.rows * e.cols
    if (e.bits === 32) {
      t[e.name] = { bits: 32, rows: e.rows, cols: e.cols, data: new Float32Array(bytes.buffer, at, n) }
    } else if (e.layout === 'blockwise') {
      t[e.name] = blockwiseView(e.bits, e.rows, e.cols, new Uint8Array(bytes.buffer, at, blockwiseBytes(e.rows, e.cols)))
    } else {
      const blobBytes = (n * e.bits) / 8
      t[e.name] = {
        bits: e.bits,
        rows: e.rows,
        cols: e.cols,
        blob: new Uint8Array(bytes.buffer, at, blobBytes),
        scales: new Float32Array(bytes.buffer, at + blobBytes, n / 32),
      }
    }
  }
  const vec = (n: WeightName): Float32Array => (t[n] as { data: Float32Array }).data
  if (b.kind === 'attention') {
    return {
      attention: {
        attn_norm: vec('attn_norm'),
        wq: t.wq!,
        wk: t.wk!,
        wv: t.wv!,
        wo: t.wo!,
        bias: t.bq ? { bq: vec('bq'), bk: vec('bk'), bv: vec('bv') } : null,
      },
    }
  }
  return { ffn: { ffn_norm: vec('ffn_norm'), w1: t.w1!, w3: t.w3!, w2: t.w2! } }
}

/** Bytes of a block of `tensors` in a window slot: quantized weights blockwise, each tensor 8-byte aligned. */
function streamedBlockBytes(tensors: readonly TensorShape[]): number {
  let bytes = 0
  for (const t of tensors) bytes = align(bytes, 8) + (t.bits === 32 ? t.rows * t.cols * 4 : blockwiseBytes(t.rows, t.cols))
  return bytes
}

/** Bytes of a stored tensor in its own layout. */
function tensorBytes(t: TensorShape): number {
  const n = t.rows * t.cols
  if (t.bits === 32) return n * 4
  if (t.layout === 'blockwise') return blockwiseBytes(t.rows, t.cols)
  return (n * t.bits) / 8 + (n / 32) * 4
}

/**
 * The streaming copy of a shard with quantized weights: `<dir>/blockwise/`, the same blocks with every 4/8-bit weight
 * laid out blockwise (splitter/quant/blockwise.ts), the layout the sliding window's graphs read (MatMulNBits is only
 * fast on constant weights). Made once, block by block (one source and one converted block in memory), checked
 * against the source's digests when reused.
 * @returns the copy's directory, and whether it was made now (else an earlier copy of the same shard was reused).
 * @throws ShardFileError as {@link readBlock} for a corrupted source block.
 */
async function prepareBlockwise(dir: string, index: ShardIndex, verify: boolean): Promise<{ dir: string; made: boolean }> {
  const out = join(dir, 'blockwise')
  const source = createHash('sha256')
    .update(index.blocks.map((b) => b.sha256).join(','))
    .digest('hex')
  try {
    const existing = JSON.parse(await readFile(join(out, 'index.json'), 'utf8')) as ShardIndex
    if (existing.source === source) return { dir: out, made: false }
  } catch {
    // not made yet (or unreadable): make it
  }
  const t0 = performance.now()
  const file = await open(join(dir, 'blocks.bin'), 'r')
  const writer = await ShardFileWriter.create(out)
  try {
    const buffer = new Uint8Array(align(Math.max(...index.blocks.map((b) => b.bytes)), 8))
    const converted = new Uint8Array(align(Math.max(...index.blocks.flatMap((b) => b.tensors.map((t) => blockwiseBytes(t.rows, t.cols)))), 8))
    for (const [i, b] of index.blocks.entries()) {
      await readBlock(file, dir, index, i, buffer, verify)
      for (const t of b.tensors) {
        const body = buffer.subarray(t.offset, t.offset + tensorBytes(t))
        if (t.bits === 32 || t.layout === 'blockwise') {
          await writer.add(b.layer, t.name, t.bits, t.rows, t.cols, body, t.layout)
          continue
        }
        const n = t.rows * t.cols
        const w = {
          bits: t.bits,
          rows: t.rows,
          cols: t.cols,
          blob: body.subarray(0, (n * t.bits) / 8),
          scales: new Float32Array(body.buffer, body.byteOffset + (n * t.bits) / 8, n / 32),
        }
        nbitsToBlockwise(w, converted)
        await writer.add(b.layer, t.name, t.bits, t.rows, t.cols, converted.subarray(0, blockwiseBytes(t.rows, t.cols)), 'blockwise')
      }
    }
    const bytes = await writer.finish(source)
    log('laid %d blocks of %s out for streaming: %d bytes in %d ms', index.blocks.length, dir, bytes, Math.round(performance.now() - t0))
  } finally {
    await file.close()
  }
  return { dir: out, made: true }
}

function layoutFromIndex(index: ShardIndex): BlockLayout {
  const bitsOf = (kind: BlockKind, name: WeightName): WeightBits =>
    index.blocks.find((b) => b.kind === kind)!.tensors.find((t) => t.name === name)!.bits
  const hasA = index.blocks.some((b) => b.kind === 'attention')
  const hasF = index.blocks.some((b) => b.kind === 'ffn')
  return {
    attention: hasA ? { wq: bitsOf('attention', 'wq'), wk: bitsOf('attention', 'wk'), wv: bitsOf('attention', 'wv'), wo: bitsOf('attention', 'wo') } : null,
    ffn: hasF ? { w1: bitsOf('ffn', 'w1'), w3: bitsOf('ffn', 'w3'), w2: bitsOf('ffn', 'w2') } : null,
  }
}


/**
 * Reads block `i` of a shard into `buffer` and, with `verify`, checks its sha256 against index.json.
 * @throws ShardFileError naming the file, the layer, the block (kind, position, byte range) and both digests when
 *   the bytes differ from what was written (corruption on disk), or the file ends before the block does
 */
async function readBlock(file: FileHandle, dir: string, index: ShardIndex, i: number, buffer: Uint8Array, verify: boolean): Promise<void> {
  const b = index.blocks[i]!
  const { bytesRead } = await file.read(buffer, 0, b.bytes, b.offset)
  checkWholeBlock(dir, index, i, bytesRead)
  if (!verify) return
  const sum = createHash('sha256').update(buffer.subarray(0, b.bytes)).digest('hex')
  if (sum !== b.sha256) {
    throw new ShardFileError(`${blockName(dir, index, i)} fails its sha256 check (index.json says ${b.sha256.slice(0, 16)}…, the file has ${sum.slice(0, 16)}…): corrupted on disk`)
  }
}

/** @throws ShardFileError naming block `i` when `bytesRead`, what a read of it got, is short of its size (the file ends early) */
function checkWholeBlock(dir: string, index: ShardIndex, i: number, bytesRead: number): void {
  const bytes = index.blocks[i]!.bytes
  if (bytesRead !== bytes) throw new ShardFileError(`${blockName(dir, index, i)} is truncated: ${bytesRead} of ${bytes} bytes`)
}

/** A block as errors name it: the file, the layer, the block (kind, position, byte range). */
function blockName(dir: string, index: ShardIndex, i: number): string {
  const b = index.blocks[i]!
  return `shard file ${join(dir, 'blocks.bin')}: layer ${b.layer} ${b.kind} block (block ${i + 1} of ${index.blocks.length}, bytes ${b.offset}..${b.offset + b.bytes})`
}

/** A CRC-32 as 8 hex digits. */
function hex32(value: number): string {
  return (value >>> 0).toString(16).padStart(8, '0')
}

/**
 * Reads a shard directory's index.json.
 * @throws ShardFileError naming the file when it is missing or not a shard index
 */
async function readIndex(dir: string): Promise<ShardIndex> {
  const path = join(dir, 'index.json')
  let index: ShardIndex
  try {
    index = JSON.parse(await readFile(path, 'utf8')) as ShardIndex
  } catch (err) {
    throw new ShardFileError(`shard index ${path} cannot be read: ${(err as Error).message}`)
  }
  if (index?.version !== 1 || !Array.isArray(index.blocks) || index.blocks.length === 0) {
    throw new ShardFileError(`shard index ${path} is not a version 1 shard index with blocks`)
  }
  return index
}

/**
 * Opens a shard directory: all blocks resident when the budget holds the whole shard plus the KV cache, otherwise
 * a {@link StreamingStore} with the largest window the budget allows.
 * @throws MemoryBudgetError, ShardFileError as {@link StreamingStore.open}.
 */
export async function openShard(dir: string, options: StreamingOptions): Promise<WeightStore> {
  const index = await readIndex(dir)
  const total = index.blocks.reduce((sum, b) => sum + b.bytes, 0)
  if (options.budgetBytes < total + options.kvCacheBytes) return StreamingStore.open(dir, options)
  const file = await open(join(dir, 'blocks.bin'), 'r')
  try {
    const layers: { attention: AttentionShardWeights | null; ffn: FfnShardWeights | null }[] = Array.from({ length: index.layers }, () => ({
      attention: null,
      ffn: null,
    }))
    for (const [i, b] of index.blocks.entries()) {
      const bytes = new Uint8Array(align(b.bytes, 8))
      await readBlock(file, dir, index, i, bytes, options.verify ?? true)
      Object.assign(layers[b.layer]!, blockWeights(b, bytes))
    }
    log('shard %s resident: %d bytes within a budget of %d', dir, total, options.budgetBytes)
    return new ResidentStore(layers)
  } finally {
    await file.close()
  }
}
