import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { HAVE_MODELS, MODELS_DIR, runCli } from '../support/cli.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-cli-'))

/** The user sees one line naming the file, exit code 2, no stack trace. */
async function expectInputError(args: string[], mentions: RegExp): Promise<void> {
  const r = await runCli(args)
  expect(r.code).toBe(2)
  const lines = r.stderr.trimEnd().split('\n')
  expect(lines).toHaveLength(1)
  expect(lines[0]).toMatch(/^edgeshard: /)
  expect(lines[0]).toMatch(mentions)
  expect(r.stderr).not.toMatch(/\n\s+at /)
  expect(r.stdout.length).toBe(0)
}

describe('edgeshard run refuses bad models with one line and exit code 2', () => {
  it('a missing file', async () => {
    const path = join(dir, 'nope.bin')
    await expectInputError(['run', '--model', path, '--peers', '1'], new RegExp(`${path}.*no such file`))
  })

  it('a text file', async () => {
    const path = join(dir, 'notes.txt')
    writeFileSync(path, 'these are not weights\n'.repeat(10))
    await expectInputError(['run', '--model', path, '--peers', '1'], new RegExp(`${path}.*expected a GGUF file`))
  })

  it.skipIf(!HAVE_MODELS)('a truncated llama2.c checkpoint and a truncated GGUF', async () => {
    const bin = join(dir, 'cut.bin')
    writeFileSync(bin, readFileSync(join(MODELS_DIR, 'stories260K.bin')).subarray(0, 500_000))
    copyFileSync(join(MODELS_DIR, 'tok512.bin'), join(dir, 'tok512.bin'))
    await expectInputError(['run', '--model', bin, '--peers', '1'], new RegExp(`${bin}.*500000 bytes`))
    const gguf = join(dir, 'cut.gguf')
    writeFileSync(gguf, readFileSync(join(MODELS_DIR, 'stories260K.gguf')).subarray(0, 600_000))
    await expectInputError(['run', '--model', gguf, '--peers', '1'], new RegExp(`${gguf}.*tensor`))
  })

  it.skipIf(!HAVE_MODELS)('an impossible plan, before any worker starts', async () => {
    await expectInputError(
      ['run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--peers', '200'],
      /FFN width 172 .* over 200 peers: at most 172/,
    )
  })

  it('a bad flag value', async () => {
    const r = await runCli(['run', '--peers', 'three'])
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(/--peers.*expected a whole number/)
  })

  it('a wire dtype other than f32 or f16, on run, serve and emulate: one line naming the value and the choices', async () => {
    const cluster = new URL('../../devices/examples/pi-cluster.json', import.meta.url).pathname
    for (const args of [['run', '--peers', '1'], ['serve', '--peers', '1'], ['emulate', '--cluster', cluster]]) {
      const r = await runCli([...args, '--wire-dtype', 'bf16'])
      expect(r.code).toBe(2)
      expect(r.stderr.trimEnd().split('\n')).toEqual(["error: option '--wire-dtype <dtype>' argument 'bf16' is invalid. Allowed choices are f32, f16."])
      expect(r.stdout.length).toBe(0)
    }
  })

  it('emulate with --memory-budget (budgets come from the cluster file) or an unknown plan keyword', async () => {
    const cluster = new URL('../../devices/examples/pi-cluster.json', import.meta.url).pathname
    await expectInputError(['emulate', '--cluster', cluster, '--memory-budget', '1MB'], /emulate takes memory budgets from --cluster .*drop --memory-budget/)
    await expectInputError(['run', '--plan', 'fast'], /invalid plan 'fast': expected tp, pipeline, hybrid, auto or stages/)
  })
})
