import { crc32 } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import {
  type BottleneckCodec,
  CODEC_COMPRESSIONS,
  CODEC_QUANTIZATIONS,
  type CodecTensor,
  codecName,
  decodeBottleneck,
  encodeBottleneck,
  f16BitsToF32,
  f32ToF16Bits,
  parseCodec,
} from '../../transport/index.ts'
import { seededRandom } from './helpers.ts'

/** [2, 3, 4, 5] f32: channel c of item n holds values around 10·c with spread 1 + c (so channels differ in range). */
function activation(): CodecTensor {
  const random = seededRandom(7)
  const dims = [2, 3, 4, 5]
  const data = new Float32Array(120)
  for (let k = 0; k < data.length; k++) {
    const c = Math.floor(k / 20) % 3
    data[k] = 10 * c + (random() * 2 - 1) * (1 + c)
  }
  return { type: 'float32', dims, data }
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let d = 0
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!))
  return d
}

describe('parseCodec', () => {
  it('parses quantization, compression and level, and prints them back', () => {
    expect(parseCodec('q8')).toEqual({ quantization: 'q8', compression: 'none' })
    expect(parseCodec('q8c+zstd')).toEqual({ quantization: 'q8c', compression: 'zstd' })
    expect(parseCodec('f16+brotli:11')).toEqual({ quantization: 'f16', compression: 'brotli', level: 11 })
    for (const text of ['f32', 'q4+deflate', 'q8+zstd:19']) expect(codecName(parseCodec(text))).toBe(text)
  })

  it('refuses unknown names with a RangeError naming the text', () => {
    expect(() => parseCodec('q7')).toThrow(RangeError)
    expect(() => parseCodec('q8+lzma')).toThrow(/invalid codec 'q8\+lzma'/)
    expect(() => parseCodec('q8:3')).toThrow(/needs a compression|invalid codec/)
  })
})

describe('half precision', () => {
  it('round-trips every binary16 bit pattern (NaNs stay NaN)', () => {
    for (let h = 0; h < 0x10000; h++) {
      const v = f16BitsToF32(h)
      if (Number.isNaN(v)) expect(Number.isNaN(f16BitsToF32(f32ToF16Bits(v)))).toBe(true)
      else expect(f32ToF16Bits(v)).toBe(h)
    }
  })

  it('rounds to nearest even and saturates to infinity', () => {
    expect(f16BitsToF32(f32ToF16Bits(1 + 2 ** -11))).toBe(1) // halfway between 1 and 1+2^-10: even is 1
    expect(f16BitsToF32(f32ToF16Bits(1 + 3 * 2 ** -11))).toBe(1 + 2 ** -9)
    expect(f16BitsToF32(f32ToF16Bits(70000))).toBe(Number.POSITIVE_INFINITY)
    expect(f16BitsToF32(f32ToF16Bits(2 ** -25))).toBe(0)
    expect(f16BitsToF32(f32ToF16Bits(3 * 2 ** -25))).toBe(2 ** -23)
  })
})

describe('encodeBottleneck / decodeBottleneck', () => {
  it('is lossless with f32 under every compression', () => {
    const t = activation()
    for (const compression of CODEC_COMPRESSIONS) {
      const [d] = decodeBottleneck(encodeBottleneck([t], { quantization: 'f32', compression }))
      expect(d!.type).toBe('float32')
      expect(d!.dims).toEqual([2, 3, 4, 5])
      expect(d!.data).toEqual(t.data)
    }
  })

  it('bounds the error of every quantization: f16 relative, affine by half a step of the range', () => {
    const t = activation()
    const x = t.data as Float32Array
    const range = (lo: number, hi: number) => hi - lo
    const all = range(Math.min(...x), Math.max(...x))
    const perChannelMax = Math.max(...[0, 1, 2].map((c) => range(-(1 + c), 1 + c) + 0.01))
    const bound: Record<string, number> = {
      f16: Math.max(...x.map(Math.abs)) * 2 ** -11,
      q8: all / 255 / 2 + 1e-6,
      q8c: perChannelMax / 255 / 2 + 1e-6,
      q4: all / 15 / 2 + 1e-6,
      q4c: perChannelMax / 15 / 2 + 1e-6,
    }
    for (const q of CODEC_QUANTIZATIONS.filter((q) => q !== 'f32')) {
      const [d] = decodeBottleneck(encodeBottleneck([t], { quantization: q, compression: 'deflate' }))
      expect(d!.quantization).toBe(q)
      expect(maxAbsDiff(d!.data as Float32Array, x)).toBeLessThanOrEqual(bound[q]!)
    }
    // per channel beats per tensor on tensors whose channels differ in range
    const err = (q: BottleneckCodec['quantization']) => maxAbsDiff(decodeBottleneck(encodeBottleneck([t], { quantization: q, compression: 'none' }))[0]!.data as Float32Array, x)
    expect(err('q8c')).toBeLessThan(err('q8'))
  })

  it('sizes payloads: 8-byte prefix, descriptor, scales, then 1 byte (q8) or half a byte (q4) per value', () => {
    const t = activation()
    // descriptor: count 1 + type 1 + quant 1 + rank 1 + 4 one-byte dims = 8
    expect(encodeBottleneck([t], { quantization: 'f32', compression: 'none' }).byteLength).toBe(8 + 8 + 480)
    expect(encodeBottleneck([t], { quantization: 'f16', compression: 'none' }).byteLength).toBe(8 + 8 + 240)
    expect(encodeBottleneck([t], { quantization: 'q8', compression: 'none' }).byteLength).toBe(8 + 8 + 8 + 120)
    expect(encodeBottleneck([t], { quantization: 'q8c', compression: 'none' }).byteLength).toBe(8 + 8 + 24 + 120)
    expect(encodeBottleneck([t], { quantization: 'q4', compression: 'none' }).byteLength).toBe(8 + 8 + 8 + 60)
    const zeros: CodecTensor = { type: 'float32', dims: [1, 4096], data: new Float32Array(4096) }
    for (const compression of ['deflate', 'brotli', 'zstd'] as const) {
      expect(encodeBottleneck([zeros], { quantization: 'f32', compression }).byteLength).toBeLessThan(200)
    }
  })

  it('carries several tensors of other element types raw, in order', () => {
    const ids: CodecTensor = { type: 'int64', dims: [3], data: BigInt64Array.from([1n, -2n, 3n ** 30n]) }
    const mask: CodecTensor = { type: 'bool', dims: [2, 2], data: Uint8Array.from([1, 0, 0, 1]) }
    const half: CodecTensor = { type: 'float16', dims: [2], data: Uint16Array.from([0x3c00, 0xc000]) }
    const out = decodeBottleneck(encodeBottleneck([activation(), ids, mask, half], { quantization: 'q4c', compression: 'zstd' }))
    expect(out.map((d) => [d.type, d.quantization])).toEqual([
      ['float32', 'q4c'],
      ['int64', 'f32'],
      ['bool', 'f32'],
      ['float16', 'f32'],
    ])
    expect(out[1]!.data).toEqual(ids.data)
    expect(out[2]!.data).toEqual(mask.data)
    expect(out[3]!.data).toEqual(half.data)
  })

  it('sends a float tensor with non-finite values raw under an affine codec', () => {
    const t: CodecTensor = { type: 'float32', dims: [3], data: Float32Array.from([1, Number.POSITIVE_INFINITY, Number.NaN]) }
    const [d] = decodeBottleneck(encodeBottleneck([t], { quantization: 'q8', compression: 'none' }))
    expect(d!.quantization).toBe('f32')
    expect(Array.from(d!.data as Float32Array)).toEqual([1, Number.POSITIVE_INFINITY, Number.NaN])
  })

  it('encodes a constant tensor (zero range) exactly', () => {
    const t: CodecTensor = { type: 'float32', dims: [1, 2, 3], data: new Float32Array(6).fill(-1.5) }
    for (const q of ['q8', 'q8c', 'q4', 'q4c'] as const) {
      expect(Array.from(decodeBottleneck(encodeBottleneck([t], { quantization: q, compression: 'none' }))[0]!.data as Float32Array)).toEqual(new Array(6).fill(-1.5))
    }
  })

  it('refuses a data length that does not match the dims', () => {
    expect(() => encodeBottleneck([{ type: 'float32', dims: [2, 3], data: new Float32Array(5) }], { quantization: 'f32', compression: 'none' })).toThrow(RangeError)
  })
})

describe('corrupt payloads', () => {
  const good = encodeBottleneck([activation()], { quantization: 'q8', compression: 'deflate' })

  function expectCodecError(payload: Uint8Array, message: RegExp): void {
    expect(() => decodeBottleneck(payload)).toThrow(expect.objectContaining({ name: 'CodecError', message: expect.stringMatching(message) }))
  }

  /** A payload with a valid checksum over `body` (compression none). */
  function forged(body: Uint8Array): Uint8Array {
    const p = new Uint8Array(8 + body.byteLength)
    p.set([0x45, 0x42, 1, 0])
    p.set(body, 8)
    new DataView(p.buffer).setUint32(4, crc32(body), true)
    return p
  }

  it('refuses a flipped bit anywhere after the prefix (checksum)', () => {
    for (const at of [8, 20, good.byteLength - 1]) {
      const bad = good.slice()
      bad[at]! ^= 0x10
      expectCodecError(bad, /checksum mismatch/)
    }
  })

  it('refuses bad magic, version, compression and truncation', () => {
    expectCodecError(good.subarray(0, 5), /shorter than the 8-byte prefix/)
    const magic = good.slice()
    magic[0] = 0
    expectCodecError(magic, /magic/)
    const version = good.slice()
    version[2] = 9
    expectCodecError(version, /format version 9/)
    const comp = good.slice()
    comp[3] = 7
    expectCodecError(comp, /unknown compression id 7/)
    // right checksum, wrong compression: zstd cannot read a deflate stream
    const wrong = good.slice()
    wrong[3] = 3
    expectCodecError(wrong, /zstd body does not decompress/)
  })

  it('refuses bodies whose fields do not add up, even with a valid checksum', () => {
    expectCodecError(forged(Uint8Array.from([1, 99, 0, 0])), /unknown element type code 99/)
    expectCodecError(forged(Uint8Array.from([1, 1, 9, 0])), /unknown quantization id 9/)
    expectCodecError(forged(Uint8Array.from([1, 7, 2, 1, 2])), /int64 claims quantization q8/)
    expectCodecError(forged(Uint8Array.from([1, 1, 0, 1, 4, 0, 0])), /body ends inside tensor 0 data/)
    expectCodecError(forged(Uint8Array.from([1, 2, 0, 1, 1, 5, 6])), /1 trailing bytes/)
    expectCodecError(forged(Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])), /LEB128/)
  })
})
