import { Packr } from 'msgpackr'
import { Uint8ArrayList } from 'uint8arraylist'
import { describe, expect, it } from 'vitest'
import {
  encodeFrame,
  f32Body,
  type Frame,
  FrameDecoder,
  type FrameHeader,
  MAX_HEADER_BYTES,
} from '../../transport/index.ts'
import { randomInt, seededRandom } from './helpers.ts'

/** Concatenate parts into one buffer placed at byte offset `offset` of a larger ArrayBuffer. */
function concatAt(parts: readonly Uint8Array[], offset = 0): Uint8Array {
  const total = parts.reduce((n, p) => n + p.byteLength, 0)
  const out = new Uint8Array(new ArrayBuffer(offset + total + 3), offset, total)
  let at = 0
  for (const p of parts) {
    out.set(p, at)
    at += p.byteLength
  }
  return out
}

/** A raw frame with arbitrary header bytes (for garbage tests). */
function rawFrame(headerBytes: Uint8Array, bodyLength = 0): Uint8Array {
  const out = new Uint8Array(8 + headerBytes.byteLength + bodyLength)
  const view = new DataView(out.buffer)
  view.setUint32(0, headerBytes.byteLength, true)
  view.setUint32(4, bodyLength, true)
  out.set(headerBytes, 8)
  return out
}

function errorOf(fn: () => unknown): Error {
  try {
    fn()
  } catch (err) {
    return err as Error
  }
  throw new Error('expected a throw')
}

/** Frames with seeded headers and f32 bodies (0..maxFloats values; every 7th body is 0 bytes). */
function makeFrames(seed: number, count: number, maxFloats: number): { header: FrameHeader; body: Float32Array }[] {
  const random = seededRandom(seed)
  return Array.from({ length: count }, (_, i) => {
    const n = i % 7 === 0 ? 0 : randomInt(random, 1, maxFloats)
    const body = new Float32Array(n)
    for (let k = 0; k < n; k++) body[k] = i * 1000 + k + 0.25
    return { header: { type: i % 2 === 0 ? 'ar' : 'hidden', i, tag: i * 3, note: 'x'.repeat(i % 13) }, body }
  })
}

describe('encodeFrame / FrameDecoder', () => {
  it('round-trips header and body, one frame per push', () => {
    const decoder = new FrameDecoder()
    const body = new Float32Array([1.5, -2, 3.25, 1e-7])
    const header = { type: 'hidden', layer: 3, shape: [1, 4], name: 'q', nested: { a: true } }
    const frames = decoder.push(concatAt(encodeFrame(header, body)))
    expect(frames).toHaveLength(1)
    expect(frames[0]!.header).toEqual(header)
    expect(Array.from(f32Body(frames[0]!))).toEqual(Array.from(body))
    const empty = decoder.push(concatAt(encodeFrame({ type: 'ping' })))
    expect(empty[0]!.header).toEqual({ type: 'ping' })
    expect(empty[0]!.body.byteLength).toBe(0)
    expect(decoder.idle).toBe(true)
  })

  it('sends the body by reference and as its own part', () => {
    const body = new Float32Array(16)
    const parts = encodeFrame({ type: 'x' }, body)
    expect(parts).toHaveLength(2)
    expect(parts[1]!.buffer).toBe(body.buffer)
    expect(encodeFrame({ type: 'x' }, new Uint8Array(0))).toHaveLength(1)
  })

  it('decodes a stream chopped into seeded random chunks, merged chunks and misaligned offsets', () => {
    const sent = makeFrames(1, 300, 3000)
    const parts = sent.flatMap((f) => encodeFrame(f.header, f.body))
    for (const offset of [0, 1, 2, 3, 5, 6, 7]) {
      const random = seededRandom(100 + offset)
      const wire = concatAt(parts, offset)
      const decoder = new FrameDecoder()
      const got: Frame[] = []
      let at = 0
      while (at < wire.byteLength) {
        // mostly small pieces, sometimes big ones spanning several frames; sometimes several pieces merged in a list
        const pieces = randomInt(random, 1, 3)
        const list = new Uint8ArrayList()
        for (let p = 0; p < pieces && at < wire.byteLength; p++) {
          const size = random() < 0.2 ? randomInt(random, 1, 40_000) : randomInt(random, 1, 64)
          list.append(wire.subarray(at, Math.min(wire.byteLength, at + size)))
          at += size
        }
        got.push(...decoder.push(pieces === 1 ? list.subarray() : list))
      }
      expect(decoder.idle).toBe(true)
      expect(got).toHaveLength(sent.length)
      got.forEach((frame, i) => {
        expect(frame.header).toEqual(sent[i]!.header)
        expect(frame.body.byteOffset % 8).toBe(0)
        const values = f32Body(frame)
        expect(values).toEqual(sent[i]!.body)
      })
    }
  })

  it('decodes many frames merged in one chunk, zero-copy when a body is aligned', () => {
    const sent = makeFrames(2, 50, 100)
    const wire = concatAt(
      sent.flatMap((f) => encodeFrame(f.header, f.body)),
      0,
    )
    const frames = new FrameDecoder().push(wire)
    expect(frames.map((f) => f.header)).toEqual(sent.map((f) => f.header))
    for (const frame of frames) expect(frame.body.byteOffset % 8).toBe(0)
    // a body starting at an aligned offset inside one chunk is a view of that chunk, not a copy
    const zeroCopy = frames.filter((f) => f.body.byteLength > 0 && f.body.buffer === wire.buffer)
    const copied = frames.filter((f) => f.body.byteLength > 0 && f.body.buffer !== wire.buffer)
    expect(zeroCopy.length).toBeGreaterThan(0)
    expect(copied.length).toBeGreaterThan(0)
    for (const f of copied) expect(f.body.byteOffset).toBe(0)
  })

  it('accepts a header just under 64 KiB', () => {
    const header = { type: 'big', text: 'a'.repeat(MAX_HEADER_BYTES - 100) }
    const frames = new FrameDecoder().push(concatAt(encodeFrame(header)))
    expect(frames[0]!.header).toEqual(header)
  })
})

describe('frame caps and garbage', () => {
  it('rejects frames over maxFrameBytes when encoding', () => {
    const err = errorOf(() => encodeFrame({ type: 'x' }, new Uint8Array(1000), { maxFrameBytes: 512 }))
    expect(err.name).toBe('FrameError')
    expect(err.message).toMatch(/512/)
    expect(err.message).toMatch(/10\d\d bytes/)
  })

  it('rejects a header over 64 KiB when encoding, and a bad header with TypeError', () => {
    const err = errorOf(() => encodeFrame({ type: 'x', text: 'a'.repeat(MAX_HEADER_BYTES) }))
    expect(err.name).toBe('FrameError')
    expect(err.message).toContain(String(MAX_HEADER_BYTES))
    expect(errorOf(() => encodeFrame({ kind: 1 } as unknown as FrameHeader)).name).toBe('TypeError')
  })

  it('rejects a frame over the cap from its prefix alone, naming value and cap', () => {
    const decoder = new FrameDecoder({ maxFrameBytes: 1 << 20 })
    const prefix = new Uint8Array(8)
    new DataView(prefix.buffer).setUint32(0, 10, true)
    new DataView(prefix.buffer).setUint32(4, 2 << 20, true)
    const err = errorOf(() => decoder.push(prefix))
    expect(err.name).toBe('FrameError')
    expect(err.message).toContain(String((2 << 20) + 18))
    expect(err.message).toContain(String(1 << 20))
    // the decoder stays failed
    expect(errorOf(() => decoder.push(new Uint8Array(4))).name).toBe('FrameError')
  })

  it('rejects header lengths of 0 and over 64 KiB', () => {
    const zero = new Uint8Array(8)
    expect(errorOf(() => new FrameDecoder().push(zero)).name).toBe('FrameError')
    const huge = new Uint8Array(8)
    new DataView(huge.buffer).setUint32(0, MAX_HEADER_BYTES + 1, true)
    const err = errorOf(() => new FrameDecoder().push(huge))
    expect(err.name).toBe('FrameError')
    expect(err.message).toContain(String(MAX_HEADER_BYTES + 1))
  })

  it('rejects malformed msgpack and headers that are not objects with a string type', () => {
    const packr = new Packr({ useRecords: false })
    const garbage: Uint8Array[] = [
      new Uint8Array([0x81]), // map of 1 entry, truncated
      new Uint8Array([0xc7, 0x01, 0x72, 0x01]), // unknown extension
      new Uint8Array([0xa1, 0x61, 0xff]), // trailing bytes after a value
      packr.pack([1, 2, 3]),
      packr.pack(42),
      packr.pack('ar'),
      packr.pack(null),
      packr.pack({ tag: 1 }),
      packr.pack({ type: 7 }),
      new Uint8Array([0xc1]),
    ]
    for (const header of garbage) {
      const err = errorOf(() => new FrameDecoder().push(rawFrame(header, 4)))
      expect(err.name).toBe('FrameError')
    }
    const random = seededRandom(9)
    for (let trial = 0; trial < 200; trial++) {
      const bytes = new Uint8Array(randomInt(random, 1, 64)).map(() => randomInt(random, 0, 255))
      const decoder = new FrameDecoder({ maxFrameBytes: 1 << 16 })
      try {
        decoder.push(bytes)
      } catch (err) {
        expect((err as Error).name).toBe('FrameError')
      }
    }
  })

  it('pads so the body lands 8-byte aligned where the frame starts at frameStartOffset, and decodes it in place', () => {
    for (let start = 0; start < 16; start++) {
      for (const type of ['a', 'ar', 'hidden-state']) {
        const body = new Float32Array([1, 2, 3, 4, 5])
        const parts = encodeFrame({ type, tag: start }, body, { frameStartOffset: start })
        const head = parts[0]!
        const padding = head[3]! // high byte of the first prefix word
        const headerLength = head[0]! | (head[1]! << 8) | (head[2]! << 16)
        expect(padding).toBeLessThanOrEqual(7)
        expect((start + 8 + headerLength + padding) % 8).toBe(0)
        expect(head.subarray(8 + headerLength).every((byte) => byte === 0)).toBe(true)
        // the receiver's chunk holds `start` bytes of something else before the frame
        const chunk = concatAt([new Uint8Array(start), ...parts]).subarray(start)
        const frame = new FrameDecoder().push(chunk)[0]!
        expect(frame.header).toEqual({ type, tag: start })
        expect(frame.body.buffer).toBe(chunk.buffer) // a view, no copy
        expect(Array.from(f32Body(frame))).toEqual([1, 2, 3, 4, 5])
      }
    }
    expect(encodeFrame({ type: 'x' }, null, { frameStartOffset: 3 })[0]![3]).toBe(0) // no body, no padding
    expect(() => encodeFrame({ type: 'x' }, null, { frameStartOffset: -1 })).toThrow(RangeError)
  })

  it('rejects padding over 7 bytes', () => {
    const frame = rawFrame(new Packr({ useRecords: false }).pack({ type: 'x' }), 4)
    frame[3] = 8
    const err = errorOf(() => new FrameDecoder().push(frame))
    expect(err.name).toBe('FrameError')
    expect(err.message).toContain('padding of 8 bytes')
  })

  it('f32Body rejects a body that is not a whole number of f32', () => {
    const frame = new FrameDecoder().push(concatAt(encodeFrame({ type: 'odd' }, new Uint8Array(6))))[0]!
    const err = errorOf(() => f32Body(frame))
    expect(err.name).toBe('FrameError')
    expect(err.message).toMatch(/odd.*6-byte/)
  })
})
