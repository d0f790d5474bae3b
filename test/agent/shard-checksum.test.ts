/**
 * Shard checksums (issue 8): the shard files a master and a worker write with `--memory-budget` (real processes) carry
 * a sha256 per half-layer block; one flipped byte anywhere in a block, or a truncated file, is detected when the shard
 * is opened and named: the file, the layer, the block (kind, position, byte range) and both digests.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { openShard } from '../../agent/weight-store.ts'
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

describe.skipIf(!HAVE_MODELS)('shard files written with --memory-budget', () => {
  let agent: RunningAgent
  let dirs: { role: string; dir: string }[] = []

  beforeAll(async () => {
    // Kept after the run because they are given (--shard-dir); default folders go with the session.
    const root = mkdtempSync(join(tmpdir(), 'edgeshard-checksum-'))
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
    // the master's folder, and the worker's folder around its shard-1
    for (const { role, dir } of dirs) rmSync(role === 'worker' ? join(dir, '..') : dir, { recursive: true, force: true })
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
})
