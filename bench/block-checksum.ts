/**
 * What checking every sliding-window read costs: the CRC-32 (node:zlib) the StreamingStore computes on each
 * half-layer block it reads from disk, on TinyLlama-1.1B-size blocks. Two parts:
 * - the hash alone (crc32, and sha256 for comparison) on one block of a 4-way tensor-parallel shard (f32, as the window
 *   holds it) and of the whole layer, median ms and GB/s;
 * - a shard file of `--layers` such layers read through a window of 2 blocks, token by token (every block acquired and
 *   released in execution order; no compute), with and without the check: ms and MB per token. The file was just
 *   written, so the reads come from the page cache: the least favourable case for the check (disk reads are slower).
 * Prints JSON. `npm run bench:checksum [-- --layers 4 --shards 4 --rounds 5]`.
 */
import { createHash, randomFillSync } from 'node:crypto'
import { rmSync } from 'node:fs'
import { cpus, loadavg } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { crc32 } from 'node:zlib'
import { ShardFileWriter, StreamingStore } from '../agent/weight-store.ts'
import { SYNTH_SHAPES } from '../splitter/index.ts'
import { BENCH_DIR } from './support.ts'

const { values } = parseArgs({
  options: {
    layers: { type: 'string', default: '4' },
    shards: { type: 'string', default: '4' },
    rounds: { type: 'string', default: '5' },
  },
})
const nLayers = Number(values.layers)
const nShards = Number(values.shards)
const rounds = Number(values.rounds)
const { dim, hiddenDim, nHeads, nKvHeads } = SYNTH_SHAPES['tinyllama-1.1b']!.config
const kvDim = (dim / nHeads) * nKvHeads

const median = (xs: readonly number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

/** Median ms of `f` over at least `minMs` of repeats (after one warm-up call). */
function time(f: () => unknown, minMs = 400): number {
  f()
  const samples: number[] = []
  const end = performance.now() + minMs
  while (performance.now() < end || samples.length < 3) {
    const t = performance.now()
    f()
    samples.push(performance.now() - t)
  }
  return median(samples)
}

/** f32 tensors of one shard's attention and FFN blocks: name, rows, cols (TPI-LLM's split: heads, FFN columns). */
const attention = [
  ['attn_norm', 1, dim],
  ['wq', dim / nShards, dim],
  ['wk', kvDim / nShards, dim],
  ['wv', kvDim / nShards, dim],
  ['wo', dim, dim / nShards],
] as const
const ffn = [
  ['ffn_norm', 1, dim],
  ['w1', hiddenDim / nShards, dim],
  ['w3', hiddenDim / nShards, dim],
  ['w2', dim, hiddenDim / nShards],
] as const
const blockBytes = (tensors: readonly (readonly [string, number, number])[]): number => tensors.reduce((n, [, r, c]) => n + r * c * 4, 0)

// 1. The hash alone on one block (this shard's, and the whole layer's for the FFN).
const hashes = []
for (const [label, bytes] of [
  [`attention block, 1/${nShards} shard`, blockBytes(attention)],
  [`FFN block, 1/${nShards} shard`, blockBytes(ffn)],
  ['FFN block, whole layer', blockBytes(ffn) * nShards],
] as const) {
  const buffer = randomFillSync(new Uint8Array(bytes))
  const crcMs = time(() => crc32(buffer))
  const shaMs = time(() => createHash('sha256').update(buffer).digest())
  hashes.push({ block: label, bytes, crc32Ms: crcMs, crc32GBs: bytes / crcMs / 1e6, sha256Ms: shaMs, sha256GBs: bytes / shaMs / 1e6 })
}

// 2. Reading a shard file through a window of 2 blocks, with and without the check.
const dir = join(BENCH_DIR, 'block-checksum-shard')
const writer = await ShardFileWriter.create(dir)
const body = randomFillSync(new Uint8Array(Math.max(blockBytes(attention), blockBytes(ffn))))
for (let layer = 0; layer < nLayers; layer++) {
  for (const [name, rows, cols] of [...attention, ...ffn]) await writer.add(layer, name, 32, rows, cols, body.subarray(0, rows * cols * 4))
}
const shardBytes = await writer.finish()
const reads: { checkReads: boolean; window: number; msPerToken: number; mbPerToken: number }[] = []
for (const checkReads of [false, true, false, true]) {
  const store = await StreamingStore.open(dir, { budgetBytes: 2 * blockBytes(ffn) + 4096, kvCacheBytes: 0, verify: false, checkReads })
  const perToken: number[] = []
  for (let r = 0; r <= rounds; r++) {
    const t = performance.now()
    for (let layer = 0; layer < nLayers; layer++) {
      await store.attention(layer)
      store.release(layer, 'attention')
      await store.ffn(layer)
      store.release(layer, 'ffn')
    }
    if (r > 0) perToken.push(performance.now() - t) // the first round starts the loader: not timed
  }
  await store.close()
  reads.push({ checkReads, window: store.window, msPerToken: median(perToken), mbPerToken: shardBytes / 1e6 })
}
rmSync(dir, { recursive: true, force: true })
const msOf = (check: boolean): number => median(reads.filter((r) => r.checkReads === check).map((r) => r.msPerToken))
console.log(
  JSON.stringify(
    {
      bench: 'block-checksum',
      shape: 'tinyllama-1.1b',
      shards: nShards,
      layers: nLayers,
      cpus: cpus().length,
      loadAverage: loadavg(),
      node: process.version,
      hashes,
      reads,
      readOverhead: { msPerTokenWithout: msOf(false), msPerTokenWith: msOf(true), ratio: msOf(true) / msOf(false) },
    },
    null,
    2,
  ),
)
