/**
 * Shard checksums: the shard files a master and a worker write with `--memory-budget` (real processes) carry
 * a sha256 per half-layer block; one flipped byte anywhere in a block, or a truncated file, is detected when the shard
 * is opened and named: the file, the layer, the block (kind, position, byte range) and both digests. The sliding
 * window also checks each block's CRC-32 every time it reads it: a byte flipped on disk after the open, even during a
 * generation, is named (the master's own shard: the run stops) or recovered from (a worker's shard: the worker is
 * dropped and the text is still the reference), never computed with.
 */
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { openShard, StreamingStore, type WeightStore } from '../../agent/weight-store.ts'
import { HAVE_MODELS, MODELS_DIR, type RunningAgent, referenceCases, runCli, startAgent } from '../support/cli.ts'
import { seededRandom } from '../support/random.ts'

interface Block {
  layer: number
  kind: 'attention' | 'ffn'
  offset: number
  bytes: number
}

/** Where `defaultShardDir` puts a process's shard (agent/shard-encoding.ts). */

/** Budgets that open `dir` fully resident and as a sliding window of 2 blocks (both verify every block at open). */
function budgets(dir: string): number[] {
  const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8')) as { blocks: Block[] }
  const total = index.blocks.reduce((n, b) => n + b.bytes, 0)
  const largest = Math.max(...index.blocks.map((b) => b.bytes))
  return [total, 2 * largest]
}

async function openBothWays(dir: string): Promise<void> {
  for (const budgetBytes of budgets(dir)) {
    const store = await openShard(dir, { budgetBytes, kvCacheBytes: 0 })
    await store.close()
  }
}

/** Both ways of opening `dir` (budgets from the intact index) fail with a ShardFileError matching `pattern`. */
async function expectShardError(dir: string, pattern: RegExp, budgetsBytes: readonly number[]): Promise<void> {
  for (const budgetBytes of budgetsBytes) {
    const err = await openShard(dir, { budgetBytes, kvCacheBytes: 0 }).then(
      () => undefined,
      (e: unknown) => e as Error,
    )
    expect(err?.name, `budget ${budgetBytes}`).toBe('ShardFileError')
    expect(err?.message).toMatch(pattern)
  }
}

const escapeRegExp = (text: string): string => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')

/** Flips bit `bit` of the byte at `offset` of `path` in place (the file stays open in other processes). */
function flipBit(path: string, offset: number, bit: number): void {
  const fd = openSync(path, 'r+')
  try {
    const byte = Buffer.alloc(1)
    readSync(fd, byte, 0, 1, offset)
    byte[0]! ^= 1 << bit
    writeSync(fd, byte, 0, 1, offset)
  } finally {
    closeSync(fd)
  }
}

/** Acquires and releases every block of `store` in execution order, `rounds` times (tokens). */
async function readAll(store: WeightStore, layers: number, rounds: number): Promise<void> {
  for (let r = 0; r < rounds; r++) {
    for (let layer = 0; layer < layers; layer++) {
      await store.attention(layer)
      store.release(layer, 'attention')
      await store.ffn(layer)
      store.release(layer, 'ffn')
    }
  }
}

/** `shard file …/blocks.bin: layer L kind block (block i of n, bytes a..b) fails its crc32 check on read (…)`. */
function crcError(path: string, index: { blocks: Block[] }, i: number): RegExp {
  const b = index.blocks[i]!
  return new RegExp(
    `^shard file ${escapeRegExp(path)}: layer ${b.layer} ${b.kind} block \\(block ${i + 1} of ${index.blocks.length}, bytes ${b.offset}\\.\\.${b.offset + b.bytes}\\) ` +
      'fails its crc32 check on read \\(index\\.json says [0-9a-f]{8}, the file has [0-9a-f]{8}\\): corrupted on disk after the shard was opened$',
  )
}

describe.skipIf(!HAVE_MODELS)('shard files written with --memory-budget', () => {
  // Where the shard files go (--shard-dir): kept after each run for the checks below.
  let root = ''
  let agent: RunningAgent
  let dirs: { role: string; dir: string }[] = []

  beforeAll(async () => {
    // Kept after the run because they are given (--shard-dir); default folders go with the session.
    root = mkdtempSync(join(tmpdir(), 'edgeshard-checksum-'))
    agent = await startAgent(30_000, ['--memory-budget', '400kB', '--shard-dir', join(root, 'worker')])
    const c = referenceCases()[1]!
    const r = await runCli(
      [
        'run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--prompt', c.prompt, '--workers', agent.address, '--context', '64',
        '--memory-budget', '400kB', '--max-tokens', '8', '--no-identity', '--shard-dir', join(root, 'master'),
      ],
    )
    expect(r.code, r.stderr).toBe(0)
    dirs = [
      { role: 'master', dir: join(root, 'master') },
      { role: 'worker', dir: join(root, 'worker', 'shard-1') },
    ]
    for (const { dir } of dirs) expect(existsSync(join(dir, 'index.json')), dir).toBe(true)
  }, 90_000)

  afterAll(async () => {
    await agent?.stop()
    rmSync(root, { recursive: true, force: true })
  })

  it('open cleanly as written', async () => {
    for (const { dir } of dirs) await openBothWays(dir)
  })

  it('one flipped byte in any block is detected and named: file, layer, block, digests', async () => {
    const random = seededRandom(86)
    for (const { dir } of dirs) {
      const path = join(dir, 'blocks.bin')
      const original = readFileSync(path)
      const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8')) as { blocks: Block[] }
      const ways = budgets(dir)
      for (let trial = 0; trial < 4; trial++) {
        const i = Math.floor(random() * index.blocks.length)
        const b = index.blocks[i]!
        const at = b.offset + Math.floor(random() * b.bytes)
        const corrupted = Buffer.from(original)
        corrupted[at]! ^= 1 << Math.floor(random() * 8)
        writeFileSync(path, corrupted)
        await expectShardError(
          dir,
          new RegExp(
            `^shard file ${escapeRegExp(path)}: layer ${b.layer} ${b.kind} block \\(block ${i + 1} of ${index.blocks.length}, bytes ${b.offset}\\.\\.${b.offset + b.bytes}\\) ` +
              'fails its sha256 check \\(index\\.json says [0-9a-f]{16}…, the file has [0-9a-f]{16}…\\): corrupted on disk$',
          ),
          ways,
        )
      }
      writeFileSync(path, original)
      await openBothWays(dir)
    }
  })

  it('a truncated block file and a damaged index are named too', async () => {
    const { dir } = dirs[1]!
    const path = join(dir, 'blocks.bin')
    const original = readFileSync(path)
    const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8')) as { blocks: Block[] }
    const last = index.blocks.at(-1)!
    const ways = budgets(dir)
    truncateSync(path, last.offset + 10)
    await expectShardError(dir, new RegExp(`^shard file ${escapeRegExp(path)}: layer ${last.layer} ${last.kind} block .* is truncated: 10 of ${last.bytes} bytes$`), ways)
    writeFileSync(path, original)
    const indexPath = join(dir, 'index.json')
    const indexText = readFileSync(indexPath, 'utf8')
    writeFileSync(indexPath, indexText.slice(0, 40))
    await expectShardError(dir, new RegExp(`^shard index ${escapeRegExp(indexPath)} cannot be read: `), ways)
    writeFileSync(indexPath, indexText)
    await openBothWays(dir)
  })
  it('a byte flipped after the open is caught when the sliding window reads that block, and named', async () => {
    const random = seededRandom(87)
    for (const { dir } of dirs) {
      const path = join(dir, 'blocks.bin')
      const indexPath = join(dir, 'index.json')
      const indexText = readFileSync(indexPath, 'utf8')
      const index = JSON.parse(indexText) as { layers: number; blocks: (Block & { crc32?: number })[] }
      expect(index.blocks.every((b) => typeof b.crc32 === 'number')).toBe(true)
      const layers = Math.max(...index.blocks.map((b) => b.layer)) + 1
      // An index with CRCs, and an older one without (they are taken from the bytes the sha256 check vouched for).
      const withoutCrc = JSON.stringify({ ...index, blocks: index.blocks.map(({ crc32: _, ...b }) => b) })
      for (const text of [indexText, withoutCrc]) {
        writeFileSync(indexPath, text)
        const store = await StreamingStore.open(dir, { budgetBytes: budgets(dir)[1]!, kvCacheBytes: 0 })
        try {
          await readAll(store, layers, 1)
          const i = Math.floor(random() * index.blocks.length)
          const b = index.blocks[i]!
          const at = b.offset + Math.floor(random() * b.bytes)
          const bit = Math.floor(random() * 8)
          flipBit(path, at, bit)
          const err = await readAll(store, layers, 2).then(
            () => undefined,
            (e: unknown) => e as Error,
          )
          flipBit(path, at, bit)
          expect(err?.name).toBe('ShardFileError')
          expect(err?.message).toMatch(crcError(path, index, i))
        } finally {
          await store.close()
        }
      }
      writeFileSync(indexPath, indexText)
      await openBothWays(dir)
    }
  })

  it("corrupting a worker's shard file mid-generation: named, the worker dropped, the text still the reference", async () => {
    const c = referenceCases()[0]!
    const summary = join(tmpdir(), `edgeshard-crc-${process.pid}.json`)
    const dir = join(root, 'worker', 'shard-1')
    let corrupted: { i: number; index: { blocks: Block[] } } | null = null
    const r = await runCli(
      ['run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--prompt', c.prompt, '--workers', agent.address, '--context', '256', '--max-tokens', String(c.steps - c.prompt_tokens.length + 1), '--no-identity', '--summary-json', summary],
      {
        onSpawn: (child) =>
          child.stdout!.on('data', () => {
            if (corrupted) return
            // Generation is under way: the worker reads every block at every token.
            const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8')) as { blocks: Block[] }
            const i = 3 % index.blocks.length
            flipBit(join(dir, 'blocks.bin'), index.blocks[i]!.offset + 5, 2)
            corrupted = { i, index }
          }),
      },
    )
    expect(r.code, r.stderr).toBe(0)
    expect(corrupted).not.toBeNull()
    const { i, index } = corrupted!
    expect(r.stdout.toString('utf8')).toBe(c.stdout)
    expect((JSON.parse(readFileSync(summary, 'utf8')) as { nextTokens: number[] }).nextTokens).toEqual(c.next_tokens)
    rmSync(summary, { force: true })
    // The notice names the worker's report: the file, the layer, the block.
    const b = index.blocks[i]!
    const named = `worker 1 \\(peer \\S+\\) lost \\(failed: shard file ${escapeRegExp(join(dir, 'blocks.bin'))}: layer ${b.layer} ${b.kind} block \\(block ${i + 1} of ${index.blocks.length}, bytes ${b.offset}\\.\\.${b.offset + b.bytes}\\) fails its crc32 check on read`
    expect(r.stderr).toMatch(new RegExp(named))
    expect(r.stderr).toMatch(/the master took over its shard \(it continues alone; it runs shards 0, 1\)/)
  }, 90_000)

  it("corrupting the master's own shard file mid-generation stops the run with the block named; the text so far is the reference's", async () => {
    const c = referenceCases()[0]!
    let dir = ''
    let corrupted: { i: number; index: { blocks: Block[] } } | null = null
    const r = await runCli(
      ['run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--prompt', c.prompt, '--peers', '1', '--context', '256', '--memory-budget', '700kB', '--max-tokens', String(c.steps - c.prompt_tokens.length + 1), '--no-identity', '--shard-dir', join(root, 'master-crc')],
      {
        onSpawn: (child) => {
          dir = join(root, 'master-crc')
          child.stdout!.on('data', () => {
            if (corrupted) return
            const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8')) as { blocks: Block[] }
            const i = 6 % index.blocks.length
            flipBit(join(dir, 'blocks.bin'), index.blocks[i]!.offset + index.blocks[i]!.bytes - 1, 7)
            corrupted = { i, index }
          })
        },
      },
    )
    rmSync(dir, { recursive: true, force: true })
    expect(corrupted).not.toBeNull()
    expect(r.code).toBe(1)
    const { i, index } = corrupted!
    expect(r.stderr.trim().split('\n').at(-1)).toMatch(new RegExp(`^edgeshard: ${crcError(join(dir, 'blocks.bin'), index, i).source.slice(1)}`))
    // No token computed with the bad block: what was printed is the start of the reference.
    const out = r.stdout.toString('utf8')
    expect(out.length).toBeGreaterThan(0)
    expect(c.stdout.startsWith(out)).toBe(true)
  }, 90_000)
})
