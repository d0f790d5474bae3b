import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { expectFormatError } from './format-error.ts'

const EXPECTED = 'expected a GGUF file (magic GGUF) or a llama2.c checkpoint'

describe('loadModel on files that are not models', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-load-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('names a missing path', () => {
    const path = join(dir, 'missing.gguf')
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, 'no such file')
  })

  it('names a directory', () => {
    const path = join(dir, 'folder')
    mkdirSync(path)
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, 'is a directory')
  })

  it('names an empty file', () => {
    const path = join(dir, 'empty.bin')
    writeFileSync(path, '')
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, 'file is empty', EXPECTED)
  })

  it('names a text file, with a one-line message', () => {
    const path = join(dir, 'notes.txt')
    writeFileSync(path, 'These are not the weights you are looking for.\nSecond line.\n')
    const err = expectFormatError(() => loadModel(path), 'ModelFormatError', path, EXPECTED)
    expect(err.message).toContain('54 68 65 73') // 'Thes'
  })

  it('names a short file and a PNG image', () => {
    const short = join(dir, 'short.bin')
    writeFileSync(short, 'hi')
    expectFormatError(() => loadModel(short), 'ModelFormatError', short, 'file is 2 bytes', EXPECTED)
    const png = join(dir, 'image.png')
    const bytes = new Uint8Array(64)
    bytes.set([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, 0x49, 0x48, 0x44, 0x52])
    writeFileSync(png, bytes)
    expectFormatError(() => loadModel(png), 'ModelFormatError', png, EXPECTED, '89 50 4e 47')
  })

  it('recognises a llama2.c version-1 export and says which format is supported', () => {
    const path = join(dir, 'v1.bin')
    const bytes = new Uint8Array(256)
    new DataView(bytes.buffer).setUint32(0, 0x616b3432, true)
    writeFileSync(path, bytes)
    expectFormatError(() => loadModel(path), 'ModelFormatError', path, 'version-1/2 export')
  })
})
