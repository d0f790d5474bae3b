import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { readTensorF32 } from '../../../splitter/formats/read-tensor.ts'
import { HAVE_MODELS, MODELS_DIR, referenceCases, runCli } from '../../support/cli.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-quantize-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const cases = referenceCases()

interface Summary {
  promptTokens: number[]
  nextTokens: number[]
}

describe.skipIf(!HAVE_MODELS)('edgeshard quantize on stories260K', () => {
  const f16 = join(dir, 'stories260K-f16.gguf')

  it('converts stories260K.gguf to f16: 2-D weights f16, norms f32, values within f16 rounding', async () => {
    const result = await runCli(['quantize', join(MODELS_DIR, 'stories260K.gguf'), f16, '--type', 'f16'])
    expect(result.stderr).toMatch(/wrote .*stories260K-f16\.gguf: 48 tensors, f16/)
    expect(result.code).toBe(0)
    expect(readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([])
    const source = loadModel(join(MODELS_DIR, 'stories260K.gguf'))
    const model = loadModel(f16)
    expect(model.config).toEqual(source.config)
    expect(model.vocab?.tokens).toEqual(source.vocab?.tokens)
    for (const [name, ref] of model.tensors) {
      expect(ref.dtype, name).toBe(ref.shape.length === 1 ? 'f32' : 'f16')
      const a = readTensorF32(source, name)
      const b = readTensorF32(model, name)
      for (let i = 0; i < a.length; i++) expect(Math.abs(a[i]! - b[i]!)).toBeLessThanOrEqual(Math.abs(a[i]!) * 2 ** -11 + 2 ** -25)
    }
  })

  for (const peers of [1, 3]) {
    it(`the f16 model gives the reference tokens of every case on ${peers} peer${peers > 1 ? 's' : ''}`, async () => {
      expect(existsSync(f16)).toBe(true)
      for (const [index, c] of cases.entries()) {
        const summaryPath = join(dir, `f16-${peers}-${index}.json`)
        const result = await runCli([
          'run', '--model', f16, '--prompt', c.prompt, '--peers', String(peers),
          '--max-tokens', String(c.steps - c.prompt_tokens.length + 1), '--temperature', '0',
          '--context', '512', '--summary-json', summaryPath, '--quiet',
        ])
        expect(result.stderr).toBe('')
        expect(result.code).toBe(0)
        const summary = JSON.parse(readFileSync(summaryPath, 'utf8')) as Summary
        expect(summary.promptTokens).toEqual(c.prompt_tokens)
        expect(summary.nextTokens, `case ${index} (${JSON.stringify(c.prompt)})`).toEqual(c.next_tokens)
      }
    }, 300_000) // 4 cases; under heavy load (shared 2-core box) one 3-peer case can take 30 s
  }

  it('q8_0 from the llama2.c checkpoint (tok512.bin beside it): ffn_down [64, 172] falls back to f16 with a notice', async () => {
    const out = join(dir, 'stories260K-q8_0.gguf')
    const result = await runCli(['quantize', join(MODELS_DIR, 'stories260K.bin'), out, '--type', 'q8_0'])
    expect(result.code).toBe(0)
    const notices = result.stderr.split('\n').filter((l) => l.includes('notice:'))
    expect(notices).toHaveLength(5)
    expect(notices[0]).toBe(
      'edgeshard: notice: blk.0.ffn_down.weight [64, 172]: innermost dimension 172 is not a multiple of 32, stored as f16 instead of q8_0',
    )
    const model = loadModel(out)
    expect(model.tensors.get('blk.0.ffn_down.weight')!.dtype).toBe('f16')
    expect(model.tensors.get('blk.0.ffn_gate.weight')!.dtype).toBe('q8_0')
    expect(model.tensors.get('token_embd.weight')!.dtype).toBe('q8_0')
    expect(model.tensors.get('output_norm.weight')!.dtype).toBe('f32')
    expect(model.vocab?.tokens[1]).toBe('<s>') // llama2.c's "\n<s>\n" normalised as llama.cpp writes it
    const quiet = await runCli(['quantize', join(MODELS_DIR, 'stories260K.bin'), out, '--type', 'q4_0', '--quiet'])
    expect(quiet.code).toBe(0)
    expect(quiet.stderr).toBe('')
    expect(loadModel(out).tensors.get('blk.0.ffn_gate.weight')!.dtype).toBe('q4_0')
  })

  it('bad input: one line on stderr, exit code 2, nothing written', async () => {
    const out = join(dir, 'bad.gguf')
    const missing = await runCli(['quantize', join(dir, 'nope.gguf'), out, '--type', 'f16'])
    expect(missing.code).toBe(2)
    expect(missing.stderr).toMatch(/^edgeshard: cannot load model .*nope\.gguf: no such file\n$/)

    const badType = await runCli(['quantize', join(MODELS_DIR, 'stories260K.gguf'), out, '--type', 'q5_0'])
    expect(badType.code).toBe(2)
    expect(badType.stderr).toMatch(/q5_0/)

    const noDir = await runCli(['quantize', join(MODELS_DIR, 'stories260K.gguf'), join(dir, 'no', 'x.gguf'), '--type', 'f16'])
    expect(noDir.code).toBe(2)
    expect(noDir.stderr).toMatch(/^edgeshard: cannot write .*x\.gguf: folder .* does not exist\n$/)

    // A llama2.c checkpoint with no tokenizer beside it.
    const lonely = join(dir, 'lonely')
    rmSync(lonely, { recursive: true, force: true })
    const { mkdirSync } = await import('node:fs')
    mkdirSync(lonely)
    copyFileSync(join(MODELS_DIR, 'stories260K.bin'), join(lonely, 'model.bin'))
    const noTok = await runCli(['quantize', join(lonely, 'model.bin'), out, '--type', 'f16'])
    expect(noTok.code).toBe(2)
    expect(noTok.stderr).toMatch(/^edgeshard: no tokenizer for .*model\.bin: looked for .*tok512\.bin/)
    expect(noTok.stderr.trim().split('\n')).toHaveLength(1)
    // ... which --tokenizer fixes.
    const withTok = await runCli(['quantize', join(lonely, 'model.bin'), out, '--type', 'f16', '--tokenizer', join(MODELS_DIR, 'tok512.bin'), '--quiet'])
    expect(withTok.code).toBe(0)
    rmSync(out)

    const notModel = await runCli(['quantize', join(MODELS_DIR, 'stories260K.reference.json'), out, '--type', 'f16'])
    expect(notModel.code).toBe(2)
    expect(existsSync(out)).toBe(false)
    expect(existsSync(`${out}.tmp`)).toBe(false)
  })
})
