import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { readGguf } from '../../../splitter/formats/gguf.ts'
import { readTensorBytes, readTensorF32 } from '../../../splitter/formats/read-tensor.ts'
import { expectFormatError } from './format-error.ts'
import { buildGguf, tinyLlamaKvs, tinyLlamaTensors, tinyValues } from './gguf-fixture.ts'

describe('readTensorF32 / readTensorBytes', () => {
  let dir: string
  let path: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-read-'))
    path = join(dir, 'tiny.gguf')
    writeFileSync(path, buildGguf({ kvs: tinyLlamaKvs(), tensors: tinyLlamaTensors('f32') }))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('reads exactly one tensor', () => {
    const model = readGguf(path)
    expect([...readTensorF32(model, 'blk.0.attn_k.weight')]).toEqual(tinyValues(5, 8))
    expect(readTensorBytes(model, 'output_norm.weight')).toEqual(new Uint8Array(Float32Array.from(tinyValues(1, 4)).buffer))
  })

  it('names an unknown tensor and the file', () => {
    const model = readGguf(path)
    expectFormatError(() => readTensorF32(model, 'blk.9.attn_q.weight'), 'ModelFormatError', path, 'no tensor named blk.9.attn_q.weight')
    expectFormatError(() => readTensorBytes(model, 'nope'), 'ModelFormatError', path, 'nope')
  })

  it('notices a file that shrank after it was described', () => {
    const shrinking = join(dir, 'shrinks.gguf')
    const bytes = buildGguf({ kvs: tinyLlamaKvs(), tensors: tinyLlamaTensors('f32') })
    writeFileSync(shrinking, bytes)
    const model = readGguf(shrinking)
    writeFileSync(shrinking, bytes.subarray(0, bytes.byteLength - 8))
    expectFormatError(() => readTensorF32(model, 'blk.0.ffn_up.weight'), 'ModelFormatError', shrinking, 'the file ends after')
  })
})
