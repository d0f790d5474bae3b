import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { readGguf } from '../../../splitter/formats/gguf.ts'
import type { DType, ModelDescription, TensorRef } from '../../../splitter/model.ts'
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

/** A description of raw bytes written to `path`: one tensor per entry, laid out back to back. */
function rawModel(path: string, entries: { name: string; dtype: DType; shape: number[]; bytes: Uint8Array; file?: string }[]): ModelDescription {
  const tensors = new Map<string, TensorRef>()
  const parts: Uint8Array[] = []
  let offsetBytes = 16 // some leading bytes, so offsets are not 0
  parts.push(new Uint8Array(16).fill(0xee))
  for (const e of entries) {
    tensors.set(e.name, {
      name: e.name,
      dtype: e.dtype,
      shape: e.shape,
      offsetBytes,
      byteLength: e.bytes.byteLength,
      ...(e.file !== undefined ? { file: e.file } : {}),
    })
    parts.push(e.bytes)
    offsetBytes += e.bytes.byteLength
  }
  writeFileSync(path, Buffer.concat(parts))
  const config = { arch: 'llama', dim: 1, hiddenDim: 1, nLayers: 0, nHeads: 1, nKvHeads: 1, headDim: 1, vocabSize: 1, maxSeqLen: 1, normEps: 1e-5, ropeTheta: 10000, ropeStyle: 'adjacent' } as const
  return { path, format: 'gguf', config, tensors }
}

describe('readTensorF32 widens and dequantizes every dtype (blocks built by hand from the GGUF spec)', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'edgeshard-dtypes-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  // Q8_0 block (34 bytes): f16 d, then 32 int8 q; value = q·d.
  const q8 = (dBits: number, q: number[]): Uint8Array => {
    const b = new Uint8Array(34)
    b[0] = dBits & 0xff
    b[1] = dBits >> 8
    q.forEach((v, j) => {
      b[2 + j] = v & 0xff
    })
    return b
  }
  // Q4_0 block (18 bytes): f16 d, then byte j = weight j (low nibble) | weight j+16 (high nibble); value = (n − 8)·d.
  const q4 = (dBits: number, nibbles: number[]): Uint8Array => {
    const b = new Uint8Array(18)
    b[0] = dBits & 0xff
    b[1] = dBits >> 8
    for (let j = 0; j < 16; j++) b[2 + j] = nibbles[j]! | (nibbles[j + 16]! << 4)
    return b
  }

  it('q8_0: int8 · d per block of 32', () => {
    const qa = Array.from({ length: 32 }, (_, j) => [-128, -1, 0, 1, 127][j % 5]!)
    const qb = Array.from({ length: 32 }, (_, j) => j - 16)
    // d = 0.25 (f16 0x3400) and d = -3 (f16 0xc200)
    const model = rawModel(join(dir, 'q8.bin'), [{ name: 'w', dtype: 'q8_0', shape: [2, 32], bytes: Buffer.concat([q8(0x3400, qa), q8(0xc200, qb)]) }])
    expect([...readTensorF32(model, 'w')]).toEqual([...qa.map((q) => q * 0.25), ...qb.map((q) => q * -3)])
  })

  it('q4_0: (nibble − 8) · d, low nibbles weights 0–15, high nibbles 16–31', () => {
    const na = Array.from({ length: 32 }, (_, j) => j % 16) // weights 0–15: 0..15, 16–31: 0..15
    const nb = Array.from({ length: 32 }, (_, j) => 15 - (j % 16))
    // d = 1.5 (f16 0x3e00) and d = 2^-14 (f16 0x0400, the smallest normal)
    const model = rawModel(join(dir, 'q4.bin'), [{ name: 'w', dtype: 'q4_0', shape: [1, 64], bytes: Buffer.concat([q4(0x3e00, na), q4(0x0400, nb)]) }])
    expect([...readTensorF32(model, 'w')]).toEqual([...na.map((n) => (n - 8) * 1.5), ...nb.map((n) => (n - 8) * 2 ** -14)])
  })

  it('f16 and bf16 widen exactly', () => {
    const f16 = Uint8Array.of(0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00) // 1, -2, 65504, 2^-24
    const bf16 = Uint8Array.of(0x80, 0x3f, 0x49, 0xc0, 0x80, 0x7f, 0x00, 0x00) // 1, -3.140625, +inf, 0
    const model = rawModel(join(dir, 'half.bin'), [
      { name: 'h', dtype: 'f16', shape: [4], bytes: f16 },
      { name: 'b', dtype: 'bf16', shape: [2, 2], bytes: bf16 },
    ])
    expect([...readTensorF32(model, 'h')]).toEqual([1, -2, 65504, 2 ** -24])
    expect([...readTensorF32(model, 'b')]).toEqual([1, -3.140625, Number.POSITIVE_INFINITY, 0])
  })

  it('reads a tensor from its own file (sharded safetensors) and names that file in errors', () => {
    const shard = join(dir, 'shard.bin')
    const inShard = rawModel(shard, [{ name: 'x', dtype: 'f32', shape: [2], bytes: new Uint8Array(Float32Array.of(7, -8).buffer) }])
    const ref = inShard.tensors.get('x')!
    const model: ModelDescription = { ...inShard, path: join(dir, 'folder'), tensors: new Map([['x', { ...ref, file: shard }]]) }
    expect([...readTensorF32(model, 'x')]).toEqual([7, -8])
    expect(readTensorBytes(model, 'x')).toEqual(new Uint8Array(Float32Array.of(7, -8).buffer))
    writeFileSync(shard, new Uint8Array(20))
    expectFormatError(() => readTensorBytes(model, 'x'), 'ModelFormatError', shard, 'tensor x needs 8 bytes at offset 16', 'ends after 4')
  })

  it('refuses a byte length that disagrees with shape × dtype, naming the tensor and its offset', () => {
    const path = join(dir, 'mismatch.bin')
    const model = rawModel(path, [{ name: 'w', dtype: 'q4_0', shape: [2, 32], bytes: new Uint8Array(34) }])
    expectFormatError(() => readTensorF32(model, 'w'), 'ModelFormatError', path, 'tensor w is 34 bytes at offset 16', 'q4_0 needs 36')
    const odd = rawModel(join(dir, 'odd.bin'), [{ name: 'v', dtype: 'q8_0', shape: [3, 16], bytes: new Uint8Array(51) }])
    expectFormatError(() => readTensorF32(odd, 'v'), 'ModelFormatError', join(dir, 'odd.bin'), 'tensor v', 'not a multiple of 32')
  })
})
