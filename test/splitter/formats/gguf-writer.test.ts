import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { readGgufMetadata } from '../../../splitter/formats/gguf.ts'
import { GGML_TYPE_IDS, type GgufTensorSpec, type GgufWriteValue, gguf, writeGguf } from '../../../splitter/formats/gguf-writer.ts'
import { loadModel } from '../../../splitter/formats/load-model.ts'
import { readTensorBytes } from '../../../splitter/formats/read-tensor.ts'
import type { DType } from '../../../splitter/model.ts'
import { decodeToF32, encodeFromF32 } from '../../../splitter/quant/dtype-codec.ts'
import { tensorBytes } from '../../../splitter/quant/ggml-blocks.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-gguf-writer-'))

/** Bytes 0, 1, 2, ... (mod 251) of the size `dtype` × `shape` needs: any byte pattern is a valid tensor to store. */
function patternBytes(dtype: DType, shape: number[], salt: number): Uint8Array {
  const n = tensorBytes(dtype, shape)
  return Uint8Array.from({ length: n }, (_, i) => (i + salt) % 251)
}

/** A tensor whose data arrives in chunks of `chunkBytes`. */
function chunked(name: string, dtype: DType, shape: number[], bytes: Uint8Array, chunkBytes = 7): GgufTensorSpec {
  return {
    name,
    dtype,
    shape,
    data: function* () {
      for (let o = 0; o < bytes.byteLength; o += chunkBytes) yield bytes.slice(o, o + chunkBytes)
    },
  }
}

describe('writeGguf', () => {
  it('writes metadata of every type that readGgufMetadata reads back unchanged', async () => {
    const path = join(dir, 'meta.gguf')
    const metadata: [string, GgufWriteValue][] = [
      ['general.architecture', 'llama'],
      ['t.u8', gguf.u8(255)],
      ['t.i8', gguf.i8(-128)],
      ['t.u16', gguf.u16(65535)],
      ['t.i16', gguf.i16(-32768)],
      ['t.u32', gguf.u32(4294967295)],
      ['t.i32', gguf.i32(-2147483648)],
      ['t.f32', gguf.f32(1e-5)],
      ['t.f64', gguf.f64(Math.PI)],
      ['t.u64', gguf.u64(2n ** 64n - 1n)],
      ['t.i64', gguf.i64(-(2n ** 63n))],
      ['t.bool', true],
      ['t.string', 'héllo ▁wörld \n <s>'],
      ['t.empty', ''],
      ['t.strings', ['<unk>', '▁a', '', 'ü']],
      ['t.bools', [true, false, true]],
      ['t.u8s', Uint8Array.of(1, 2, 255)],
      ['t.i8s', Int8Array.of(-1, 2)],
      ['t.u16s', Uint16Array.of(65535)],
      ['t.i16s', Int16Array.of(-5)],
      ['t.u32s', Uint32Array.of(1, 4294967295)],
      ['t.i32s', Int32Array.of(1, 2, 3, -6)],
      ['t.f32s', Float32Array.of(0.5, -1.25, 3)],
      ['t.f64s', Float64Array.of(Math.E)],
      ['t.u64s', BigUint64Array.of(7n)],
      ['t.i64s', BigInt64Array.of(-7n, 8n)],
      ['t.nested', [Uint8Array.of(1, 2), Uint8Array.of(3)]],
    ]
    await writeGguf(path, metadata, [])
    const header = readGgufMetadata(path)
    expect(header.version).toBe(3)
    expect(header.alignment).toBe(32)
    expect(header.tensorInfos).toEqual([])
    const read = header.metadata
    expect([...read.keys()]).toEqual([...metadata.map(([k]) => k), 'general.alignment'])
    expect(read.get('general.alignment')).toBe(32)
    for (const [key, value] of metadata) {
      const expected = typeof value === 'object' && 'type' in value ? value.value : value
      const got = read.get(key)
      if (key === 't.f32') expect(got).toBe(Math.fround(1e-5))
      else expect(got).toEqual(expected)
    }
    // Typed arrays keep their element type.
    expect(read.get('t.i32s')).toBeInstanceOf(Int32Array)
    expect(read.get('t.f32s')).toBeInstanceOf(Float32Array)
    expect(read.get('t.u64s')).toBeInstanceOf(BigUint64Array)
  })

  it('writes tensor infos (dims innermost first, ggml type ids, aligned offsets) and each tensor’s bytes', async () => {
    const path = join(dir, 'tensors.gguf')
    const specs: [string, DType, number[]][] = [
      ['a.f32', 'f32', [3, 5]],
      ['b.f16', 'f16', [7]],
      ['c.bf16', 'bf16', [2, 3]],
      ['d.q8_0', 'q8_0', [3, 64]],
      ['e.q4_0', 'q4_0', [2, 2, 32]],
      ['f.f32', 'f32', [1]],
    ]
    const data = specs.map(([, dtype, shape], i) => patternBytes(dtype, shape, i * 13))
    const result = await writeGguf(
      path,
      [['general.architecture', 'llama']],
      specs.map(([name, dtype, shape], i) => chunked(name, dtype, shape, data[i]!, 5 + i)),
      { alignment: 64 },
    )
    const header = readGgufMetadata(path)
    expect(header.alignment).toBe(64)
    expect(header.dataOffsetBytes).toBe(result.dataOffsetBytes)
    expect(header.dataOffsetBytes % 64).toBe(0)
    expect(header.fileBytes).toBe(result.fileBytes)
    const file = readFileSync(path)
    expect(file.byteLength).toBe(result.fileBytes)
    header.tensorInfos.forEach((info, i) => {
      const [name, dtype, shape] = specs[i]!
      expect(info.name).toBe(name)
      expect(info.dims).toEqual([...shape].reverse())
      expect(info.ggmlType).toBe(GGML_TYPE_IDS[dtype])
      expect(info.relOffsetBytes % 64).toBe(0)
      const at = header.dataOffsetBytes + info.relOffsetBytes
      expect(new Uint8Array(file.subarray(at, at + data[i]!.byteLength))).toEqual(data[i])
    })
    expect(GGML_TYPE_IDS).toEqual({ f32: 0, f16: 1, q4_0: 2, q8_0: 8, bf16: 30 })
  })

  it('writes a model that loadModel reads back with the same config, vocabulary and tensor values', async () => {
    const path = join(dir, 'tiny.gguf')
    // dim 32, hidden 64, 1 layer, 2 heads of 16, 1 KV head, vocab 4: every weight's innermost dim is a multiple of 32.
    const dim = 32
    const hidden = 64
    const shapes: [string, number[], DType][] = [
      ['token_embd.weight', [4, dim], 'q8_0'],
      ['output_norm.weight', [dim], 'f32'],
      ['output.weight', [4, dim], 'q4_0'],
      ['blk.0.attn_norm.weight', [dim], 'f32'],
      ['blk.0.attn_q.weight', [dim, dim], 'f16'],
      ['blk.0.attn_k.weight', [16, dim], 'bf16'],
      ['blk.0.attn_v.weight', [16, dim], 'f32'],
      ['blk.0.attn_output.weight', [dim, dim], 'q4_0'],
      ['blk.0.ffn_norm.weight', [dim], 'f32'],
      ['blk.0.ffn_gate.weight', [hidden, dim], 'q8_0'],
      ['blk.0.ffn_down.weight', [dim, hidden], 'q4_0'],
      ['blk.0.ffn_up.weight', [hidden, dim], 'f16'],
    ]
    const values = shapes.map(([, shape], t) =>
      Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, k) => Math.sin(t * 100 + k) * 0.1),
    )
    const stored = shapes.map(([, , dtype], t) => encodeFromF32(dtype, values[t]!).slice())
    await writeGguf(
      path,
      [
        ['general.architecture', 'llama'],
        ['llama.context_length', gguf.u32(64)],
        ['llama.embedding_length', gguf.u32(dim)],
        ['llama.feed_forward_length', gguf.u32(hidden)],
        ['llama.block_count', gguf.u32(1)],
        ['llama.attention.head_count', gguf.u32(2)],
        ['llama.attention.head_count_kv', gguf.u32(1)],
        ['llama.attention.layer_norm_rms_epsilon', gguf.f32(1e-5)],
        ['llama.rope.freq_base', gguf.f32(10000)],
        ['tokenizer.ggml.model', 'llama'],
        ['tokenizer.ggml.tokens', ['<unk>', '<s>', '</s>', '▁a']],
        ['tokenizer.ggml.scores', Float32Array.of(0, 0, 0, -1)],
        ['tokenizer.ggml.bos_token_id', gguf.u32(1)],
        ['tokenizer.ggml.eos_token_id', gguf.u32(2)],
      ],
      shapes.map(([name, shape, dtype], t) => ({ name, dtype, shape, data: () => [stored[t]!] })),
    )
    const model = loadModel(path)
    expect(model.format).toBe('gguf')
    expect(model.config).toMatchObject({ arch: 'llama', dim, hiddenDim: hidden, nLayers: 1, nHeads: 2, nKvHeads: 1, headDim: 16, vocabSize: 4, maxSeqLen: 64 })
    expect(model.vocab?.tokens).toEqual(['<unk>', '<s>', '</s>', '▁a'])
    shapes.forEach(([name, shape, dtype], t) => {
      const ref = model.tensors.get(name)!
      expect(ref.dtype).toBe(dtype)
      expect(ref.shape).toEqual(shape)
      const bytes = readTensorBytes(model, name)
      expect(bytes).toEqual(stored[t])
      // What was stored decodes to the same values whichever side decodes it.
      expect(decodeToF32(dtype, bytes, values[t]!.length)).toEqual(decodeToF32(dtype, stored[t]!, values[t]!.length))
    })
  })

  it('asks for one tensor’s data only after the previous tensor is written, and accepts async producers', async () => {
    const path = join(dir, 'order.gguf')
    const log: string[] = []
    const tensor = (name: string): GgufTensorSpec => ({
      name,
      dtype: 'f32',
      shape: [8],
      data: async function* () {
        log.push(`start ${name}`)
        yield new Uint8Array(16)
        await new Promise((r) => setTimeout(r, 1))
        yield new Uint8Array(16)
        log.push(`end ${name}`)
      },
    })
    await writeGguf(path, [], [tensor('a'), tensor('b')])
    expect(log).toEqual(['start a', 'end a', 'start b', 'end b'])
  })

  it('leaves nothing behind (and an existing file untouched) when a producer fails or gives the wrong size', async () => {
    const path = join(dir, 'fail.gguf')
    writeFileSync(path, 'previous contents')
    const failing: GgufTensorSpec = {
      name: 'boom',
      dtype: 'f32',
      shape: [4],
      data: function* () {
        yield new Uint8Array(4)
        throw new Error('producer failed')
      },
    }
    await expect(writeGguf(path, [], [failing])).rejects.toThrow('producer failed')
    const short: GgufTensorSpec = { name: 'short', dtype: 'q8_0', shape: [2, 32], data: () => [new Uint8Array(34)] }
    await expect(writeGguf(path, [], [short])).rejects.toThrow(/tensor short \[2, 32\] q8_0 needs 68 bytes, its data gave 34/)
    const long: GgufTensorSpec = { name: 'long', dtype: 'f16', shape: [2], data: () => [new Uint8Array(4), new Uint8Array(1)] }
    await expect(writeGguf(path, [], [long])).rejects.toThrow(RangeError)
    const abort = new AbortController()
    abort.abort(new Error('stop'))
    await expect(
      writeGguf(path, [], [{ name: 'x', dtype: 'f32', shape: [1], data: () => [new Uint8Array(4)] }], { signal: abort.signal }),
    ).rejects.toThrow('stop')
    expect(readFileSync(path, 'utf8')).toBe('previous contents')
    expect(readdirSync(dir).filter((f) => f.startsWith('fail.gguf'))).toEqual(['fail.gguf'])
  })

  it('refuses bad input before creating any file', async () => {
    const path = join(dir, 'refused.gguf')
    const t = (dtype: DType, shape: number[]): GgufTensorSpec => ({ name: 'w', dtype, shape, data: () => [] })
    await expect(writeGguf(path, [], [t('q4_0', [64, 172])])).rejects.toThrow(/innermost dimension 172 is not a multiple of 32/)
    await expect(writeGguf(path, [], [t('f32', [1, 1, 1, 1, 1])])).rejects.toThrow(RangeError)
    await expect(writeGguf(path, [], [t('f32', [2]), t('f32', [2])])).rejects.toThrow(/twice/)
    await expect(writeGguf(path, [['k', 3 as unknown as GgufWriteValue]], [])).rejects.toThrow(TypeError)
    await expect(writeGguf(path, [['k', gguf.u8(256)]], [])).rejects.toThrow(/256 does not fit u8/)
    await expect(writeGguf(path, [['k', gguf.u32(-1)]], [])).rejects.toThrow(RangeError)
    await expect(writeGguf(path, [], [], { alignment: 24 })).rejects.toThrow(/power of two/)
    expect(existsSync(path)).toBe(false)
    expect(existsSync(`${path}.tmp`)).toBe(false)
  })
})
