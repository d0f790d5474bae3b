import { createHash } from 'node:crypto'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { readGgufMetadata } from '../../../splitter/formats/gguf.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { SYNTH_SHAPES } from '../../../splitter/synth/synth-shapes.ts'
import { runCli } from '../../support/cli.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-synth-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex')

async function synth(args: string[]): Promise<string> {
  const out = join(dir, `${args.join('_').replaceAll('-', '')}.gguf`)
  const result = await runCli(['synth', ...args, '--out', out])
  expect(result.stderr).toMatch(/wrote .*\.gguf: test-/)
  expect(result.code).toBe(0)
  return out
}

describe('edgeshard synth', () => {
  it('the same seed gives the same bytes; another seed gives another file of the same layout', async () => {
    const a = await synth(['--shape', 'test-llama', '--type', 'q4_0', '--seed', '7'])
    const b = join(dir, 'again.gguf')
    expect((await runCli(['synth', '--shape', 'test-llama', '--type', 'q4_0', '--seed', '7', '--out', b, '--quiet'])).code).toBe(0)
    const c = await synth(['--shape', 'test-llama', '--type', 'q4_0', '--seed', '8'])
    expect(sha256(a)).toBe(sha256(b))
    expect(sha256(c)).not.toBe(sha256(a))
    expect(readFileSync(c).byteLength).toBe(readFileSync(a).byteLength)
    expect(readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([])
  })

  it('a llama shape round-trips through the reader: config, vocabulary, tensor types', async () => {
    const path = await synth(['--shape', 'test-llama', '--type', 'q8_0', '--seed', '1'])
    const model = loadModel(path)
    const expected = SYNTH_SHAPES['test-llama']!.config
    expect({ ...model.config, normEps: 0 }).toEqual({ ...expected, normEps: 0 })
    expect(model.config.normEps).toBe(Math.fround(expected.normEps))
    expect(model.vocab?.tokens).toHaveLength(expected.vocabSize)
    expect(model.tensors.get('blk.1.ffn_down.weight')).toMatchObject({ dtype: 'q8_0', shape: [64, 128] })
    expect(model.tensors.get('blk.1.ffn_norm.weight')).toMatchObject({ dtype: 'f32', shape: [64] })
    expect(model.tensors.get('output.weight')!.offsetBytes).not.toBe(model.tensors.get('token_embd.weight')!.offsetBytes)
    const meta = readGgufMetadata(path).metadata
    expect(meta.get('edgeshard.synth.seed')).toBe(1n)
    expect(meta.get('general.file_type')).toBe(7)
  })

  it('a qwen2 shape round-trips: qwen2 keys, Q/K/V biases, tied classifier not stored', async () => {
    const path = await synth(['--shape', 'test-qwen2', '--type', 'f16', '--seed', '3'])
    const header = readGgufMetadata(path)
    expect(header.metadata.get('general.architecture')).toBe('qwen2')
    expect(header.metadata.get('qwen2.embedding_length')).toBe(64)
    expect(header.tensorInfos.some((t) => t.name === 'output.weight')).toBe(false)
    const model = loadModel(path)
    expect(model.config).toMatchObject({ arch: 'qwen2', qkvBias: true, ropeStyle: 'halves', dim: 64, hiddenDim: 96 })
    expect(model.tensors.get('blk.0.attn_q.bias')).toMatchObject({ dtype: 'f32', shape: [64] })
    expect(model.tensors.get('blk.0.attn_q.weight')).toMatchObject({ dtype: 'f16', shape: [64, 64] })
    expect(model.tensors.get('output.weight')!.offsetBytes).toBe(model.tensors.get('token_embd.weight')!.offsetBytes)
  })

  for (const peers of [1, 2]) {
    it(`a synthetic q4_0 model generates on ${peers} peer${peers > 1 ? 's' : ''}`, async () => {
      const path = join(dir, 'run.gguf')
      await runCli(['synth', '--shape', 'test-llama', '--type', 'q4_0', '--seed', '5', '--out', path, '--quiet'])
      const summaryPath = join(dir, `run-${peers}.json`)
      const result = await runCli([
        'run', '--model', path, '--prompt', 'Hello, wörld', '--peers', String(peers), '--max-tokens', '4',
        '--temperature', '0', '--summary-json', summaryPath, '--quiet',
      ])
      expect(result.stderr).toBe('')
      expect(result.code).toBe(0)
      const summary = JSON.parse(readFileSync(summaryPath, 'utf8')) as { generated: number; nextTokens: number[] }
      expect(summary.generated).toBeGreaterThan(0)
      expect(summary.nextTokens.every((t) => t >= 0 && t < 512)).toBe(true)
    }, 60_000)
  }

  it('bad input: exit code 2 and one line', async () => {
    const unknown = await runCli(['synth', '--shape', 'gpt-5', '--out', join(dir, 'x.gguf')])
    expect(unknown.code).toBe(2)
    expect(unknown.stderr).toBe(
      'edgeshard: unknown --shape "gpt-5", expected one of tinyllama-1.1b, llama-3.2-1b, qwen2.5-0.5b, llama-2-7b, llama-2-13b\n',
    )
    const seed = await runCli(['synth', '--shape', 'test-llama', '--seed', '-1', '--out', join(dir, 'x.gguf')])
    expect(seed.code).toBe(2)
    const noOut = await runCli(['synth', '--shape', 'test-llama'])
    expect(noOut.code).toBe(2)
    const noDir = await runCli(['synth', '--shape', 'test-llama', '--out', join(dir, 'none', 'x.gguf')])
    expect(noDir.code).toBe(2)
    expect(noDir.stderr).toMatch(/^edgeshard: cannot write .*x\.gguf: folder .* does not exist\n$/)
  })
})
