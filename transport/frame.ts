/**
 * Wire frames: a small msgpack header plus raw tensor bytes, so tensors cross the wire without serialisation copies.
 *
 * Layout of one frame (all integers little-endian):
 *
 * | bytes            | field                                                                     |
 * |------------------|---------------------------------------------------------------------------|
 * | 0..4             | u32: bits 0–23 header length H (1 ≤ H ≤ 64 KiB), bits 24–31 padding P ≤ 7 |
 * | 4..8             | u32 body length B                                                         |
 * | 8..8+H           | msgpack of a plain object with at least `type: string`                    |
 * | 8+H..8+H+P       | P zero bytes, so that the body lands 8-byte aligned in the receiver's buffer |
 * | 8+H+P..8+H+P+B   | body: raw bytes (tensors are little-endian f32, row-major)                |
 *
 * The whole frame, 8 + H + P + B bytes, is capped by `maxFrameBytes` (default 256 MiB). The sender picks P from
 * where the frame will start in the receiver's buffer (`frameStartOffset`); a receiver only skips P bytes, so any P
 * decodes correctly and a wrong guess costs one copy of the body, nothing else.
 * Why not msgpack the tensor too: msgpackr packs a Float32Array by copying and unpacks it at an arbitrary byte offset
 * (see shared/NOTES.md, "msgpackr"); a separate raw body is sent by reference and decoded without a copy when aligned.
 */
import { Packr } from 'msgpackr'
import type { Uint8ArrayList } from 'uint8arraylist'
import { FrameError } from './errors.ts'

/** Bytes before the header: u32 header length + u32 body length. */
export const FRAME_PREFIX_BYTES = 8
/** Cap on the msgpack header of one frame, bytes. */
export const MAX_HEADER_BYTES = 64 * 1024
/** Default cap on one whole frame (prefix + header + body), bytes. */
export const DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
/** Alignment, bytes, of every `Frame.body` a `FrameDecoder` returns (enough for f32, i32, f64 and i64 views). */
export const BODY_ALIGNMENT_BYTES = 8

/** The msgpack header of a frame: a plain object with a string `type`, other fields free (msgpack-able values). */
export interface FrameHeader {
  readonly type: string
  readonly [field: string]: unknown
}

/** One decoded frame. `body.byteOffset` is a multiple of `BODY_ALIGNMENT_BYTES`; an absent body is 0 bytes. */
export interface Frame {
  readonly header: FrameHeader
  readonly body: Uint8Array
}

/** Options shared by `encodeFrame` and `FrameDecoder`. */
export interface FrameOptions {
  /** Cap on one whole frame, prefix + header + padding + body, bytes. Default `DEFAULT_MAX_FRAME_BYTES` (256 MiB). */
  maxFrameBytes?: number
  /**
   * (encodeFrame only) Byte offset, modulo 8, at which the frame's first byte will sit in the receiver's buffer; the
   * padding P is chosen so that the body then starts at a multiple of 8 and is decoded without a copy. Default 0.
   * Over libp2p noise + yamux a frame sent alone follows yamux's 12-byte data-frame header in the decrypted message.
   */
  frameStartOffset?: number
}

/** Most padding bytes between header and body. */
const MAX_PADDING_BYTES = BODY_ALIGNMENT_BYTES - 1

// useRecords: false keeps the encoding self-describing (no shared record structures between peers);
// mapsAsObjects: true decodes maps to plain objects, which the header check below requires.
const packr = new Packr({ useRecords: false, mapsAsObjects: true })

function checkMaxFrameBytes(maxFrameBytes: number): number {
  if (!Number.isSafeInteger(maxFrameBytes) || maxFrameBytes < FRAME_PREFIX_BYTES + 1 || maxFrameBytes > 2 ** 32) {
    throw new RangeError(`invalid maxFrameBytes ${maxFrameBytes}: must be an integer in [9, 2^32]`)
  }
  return maxFrameBytes
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false
  const proto: unknown = Object.getPrototypeOf(value)
  return proto === Object.prototype || proto === null
}

/** A byte view of `body` over the same memory (no copy). */
function bytesOf(body: ArrayBufferView): Uint8Array {
  return body instanceof Uint8Array ? body : new Uint8Array(body.buffer, body.byteOffset, body.byteLength)
}

/**
 * Encode one frame as parts to send back to back: `[prefix + header, body]` (the body part is omitted when empty).
 * The body is returned by reference, never copied: do not modify it until it has been sent.
 *
 * @param header - plain object with a string `type`; values must be msgpack-able
 * @param body - raw bytes, or any typed array (sent as its bytes, platform order = little-endian on all targets)
 * @throws TypeError if `header` is not a plain object with a string `type`
 * @throws FrameError if the msgpack header exceeds 64 KiB or the frame exceeds `maxFrameBytes`
 */
export function encodeFrame(
  header: FrameHeader,
  body?: ArrayBufferView | null,
  options: FrameOptions = {},
): Uint8Array[] {
  if (!isPlainObject(header) || typeof header.type !== 'string') {
    throw new TypeError(`cannot encode frame header ${describe(header)}: must be a plain object with a string type`)
  }
  const maxFrameBytes = checkMaxFrameBytes(options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES)
  const headerBytes: Uint8Array = packr.pack(header)
  if (headerBytes.byteLength > MAX_HEADER_BYTES) {
    throw new FrameError(
      `cannot encode frame of type '${header.type}': header is ${headerBytes.byteLength} bytes, cap ${MAX_HEADER_BYTES}`,
    )
  }
  const bodyBytes = body == null ? null : bytesOf(body)
  const bodyLength = bodyBytes?.byteLength ?? 0
  const startOffset = options.frameStartOffset ?? 0
  if (!Number.isSafeInteger(startOffset) || startOffset < 0) {
    throw new RangeError(`invalid frameStartOffset ${startOffset}: must be a non-negative integer`)
  }
  const unaligned = (startOffset + FRAME_PREFIX_BYTES + headerBytes.byteLength) % BODY_ALIGNMENT_BYTES
  const padding = bodyLength === 0 || unaligned === 0 ? 0 : BODY_ALIGNMENT_BYTES - unaligned
  const frameBytes = FRAME_PREFIX_BYTES + headerBytes.byteLength + padding + bodyLength
  if (frameBytes > maxFrameBytes) {
    throw new FrameError(
      `cannot encode frame of type '${header.type}': ${frameBytes} bytes exceed maxFrameBytes ${maxFrameBytes}`,
    )
  }
  // byte stores, not a DataView: `head` is small enough to live on V8's heap, and reading its `.buffer` would move it
  // to a fresh off-heap ArrayBuffer on every frame
  const head = new Uint8Array(FRAME_PREFIX_BYTES + headerBytes.byteLength + padding) // padding stays zero
  writeU32LE(head, 0, headerBytes.byteLength | (padding << 24))
  writeU32LE(head, 4, bodyLength)
  head.set(headerBytes, FRAME_PREFIX_BYTES)
  return bodyBytes === null || bodyLength === 0 ? [head] : [head, bodyBytes]
}

function writeU32LE(target: Uint8Array, offset: number, value: number): void {
  target[offset] = value & 0xff
  target[offset + 1] = (value >>> 8) & 0xff
  target[offset + 2] = (value >>> 16) & 0xff
  target[offset + 3] = (value >>> 24) & 0xff
}

/**
 * Incremental decoder of a byte stream of frames. Handles frames split across chunks, several frames in one chunk,
 * and chunks at any byte offset.
 *
 * Each returned `Frame.body` starts at a byteOffset that is a multiple of 8, so
 * `new Float32Array(body.buffer, body.byteOffset, body.byteLength / 4)` works. The body is a view into the received
 * chunk when it lies inside one chunk at an aligned offset (zero-copy), otherwise one copy into a fresh buffer.
 *
 * After a `FrameError` the decoder is failed: every later `push` throws the same error.
 *
 * @example
 * const decoder = new FrameDecoder({ maxFrameBytes: 64 << 20 })
 * for await (const chunk of stream) for (const frame of decoder.push(chunk)) handle(frame)
 */
export class FrameDecoder {
  readonly maxFrameBytes: number
  /** Received chunks not yet consumed; `chunks[head]` starts at `headOffset`. */
  private chunks: Uint8Array[] = []
  private head = 0
  private headOffset = 0
  private buffered = 0
  /** Lengths of the frame whose prefix has been read and validated, or -1 while waiting for a prefix. */
  private headerLength = -1
  private paddingLength = 0
  private bodyLength = 0
  private failure: FrameError | undefined
  private readonly prefix = new Uint8Array(FRAME_PREFIX_BYTES)
  private readonly padding = new Uint8Array(MAX_PADDING_BYTES)
  private readonly prefixView = new DataView(this.prefix.buffer)

  constructor(options: FrameOptions = {}) {
    this.maxFrameBytes = checkMaxFrameBytes(options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES)
  }

  /** Bytes received but not yet returned as frames (a partial frame), bytes. */
  get bufferedBytes(): number {
    return this.buffered
  }

  /** True when the decoder sits at a frame boundary (nothing partial buffered). */
  get idle(): boolean {
    return this.buffered === 0
  }

  /**
   * Feed received bytes; returns the frames they complete, in order (possibly none).
   * @throws FrameError on a frame over a cap, a malformed msgpack header, or a header that is not an object with a
   *   string `type`; the decoder stays failed afterwards
   */
  push(chunk: Uint8Array | Uint8ArrayList): Frame[] {
    if (this.failure !== undefined) throw this.failure
    if (chunk instanceof Uint8Array) {
      this.append(chunk)
    } else {
      for (const part of chunk) this.append(part)
    }
    const frames: Frame[] = []
    try {
      for (;;) {
        const frame = this.next()
        if (frame === undefined) break
        frames.push(frame)
      }
    } catch (err) {
      this.failure =
        err instanceof FrameError ? err : new FrameError(`cannot decode frame: ${String(err)}`, { cause: err })
      this.chunks = []
      this.head = 0
      this.headOffset = 0
      this.buffered = 0
      throw this.failure
    }
    return frames
  }

  private append(part: Uint8Array): void {
    if (part.byteLength === 0) return
    this.chunks.push(part)
    this.buffered += part.byteLength
  }

  private next(): Frame | undefined {
    if (this.headerLength < 0) {
      if (this.buffered < FRAME_PREFIX_BYTES) return undefined
      this.copyOut(this.prefix, FRAME_PREFIX_BYTES)
      const lengths = this.prefixView.getUint32(0, true)
      const headerLength = lengths & 0xffffff
      const paddingLength = lengths >>> 24
      const bodyLength = this.prefixView.getUint32(4, true)
      if (headerLength === 0 || headerLength > MAX_HEADER_BYTES) {
        throw new FrameError(`frame header length ${headerLength} is outside [1, ${MAX_HEADER_BYTES}] bytes`)
      }
      if (paddingLength > MAX_PADDING_BYTES) {
        throw new FrameError(`frame padding of ${paddingLength} bytes exceeds ${MAX_PADDING_BYTES}`)
      }
      const frameBytes = FRAME_PREFIX_BYTES + headerLength + paddingLength + bodyLength
      if (frameBytes > this.maxFrameBytes) {
        throw new FrameError(`frame of ${frameBytes} bytes (body ${bodyLength}) exceeds maxFrameBytes ${this.maxFrameBytes}`)
      }
      this.headerLength = headerLength
      this.paddingLength = paddingLength
      this.bodyLength = bodyLength
    }
    if (this.buffered < this.headerLength + this.paddingLength + this.bodyLength) return undefined
    const header = decodeHeader(this.take(this.headerLength, false))
    if (this.paddingLength > 0) this.copyOut(this.padding, this.paddingLength) // skipped
    const body = this.take(this.bodyLength, true)
    this.headerLength = -1
    this.paddingLength = 0
    this.bodyLength = 0
    return { header, body }
  }

  /** Copy the next `n` buffered bytes into `target` and consume them. */
  private copyOut(target: Uint8Array, n: number): void {
    let filled = 0
    while (filled < n) {
      const chunk = this.chunks[this.head]!
      const available = chunk.byteLength - this.headOffset
      const count = Math.min(available, n - filled)
      target.set(chunk.subarray(this.headOffset, this.headOffset + count), filled)
      filled += count
      this.consume(count)
    }
  }

  /**
   * Take the next `n` buffered bytes (n ≤ buffered): a view when they lie in one chunk (and, if `aligned`, start at
   * a multiple of BODY_ALIGNMENT_BYTES), else one copy into a fresh, aligned buffer.
   */
  private take(n: number, aligned: boolean): Uint8Array {
    if (n === 0) return new Uint8Array(0)
    const chunk = this.chunks[this.head]!
    const start = this.headOffset
    if (
      chunk.byteLength - start >= n &&
      (!aligned || (chunk.byteOffset + start) % BODY_ALIGNMENT_BYTES === 0)
    ) {
      this.consume(n)
      return chunk.subarray(start, start + n)
    }
    const out = new Uint8Array(n)
    this.copyOut(out, n)
    return out
  }

  private consume(n: number): void {
    this.buffered -= n
    this.headOffset += n
    const chunk = this.chunks[this.head]!
    if (this.headOffset === chunk.byteLength) {
      this.chunks[this.head] = EMPTY // release the chunk's memory
      this.head++
      this.headOffset = 0
      if (this.head === this.chunks.length) {
        this.chunks = []
        this.head = 0
      } else if (this.head > 64 && this.head * 2 > this.chunks.length) {
        this.chunks = this.chunks.slice(this.head)
        this.head = 0
      }
    }
  }
}

const EMPTY = new Uint8Array(0)

function decodeHeader(bytes: Uint8Array): FrameHeader {
  let value: unknown
  try {
    value = packr.unpack(bytes)
  } catch (err) {
    throw new FrameError(`cannot decode frame header of ${bytes.byteLength} bytes: ${(err as Error).message}`, {
      cause: err,
    })
  }
  if (!isPlainObject(value) || typeof value.type !== 'string') {
    throw new FrameError(`frame header ${describe(value)} is not an object with a string type`)
  }
  return value as FrameHeader
}

/** A short, safe description of an untrusted value for error messages (≤ 120 characters). */
function describe(value: unknown): string {
  let text: string
  try {
    text = JSON.stringify(value) ?? String(value)
  } catch {
    text = Object.prototype.toString.call(value)
  }
  return text.length > 120 ? `${text.slice(0, 117)}...` : text
}

/**
 * The body of `frame` as little-endian f32 values ([body.byteLength / 4] f32), a view without copy when aligned
 * (always the case for frames from `FrameDecoder`), else a copy.
 * @throws FrameError if the body length is not a multiple of 4 bytes (message names the frame type and length)
 */
export function f32Body(frame: Frame): Float32Array {
  const { body } = frame
  if (body.byteLength % 4 !== 0) {
    throw new FrameError(
      `frame of type '${frame.header.type}' has a ${body.byteLength}-byte body: not a multiple of 4, cannot view as f32`,
    )
  }
  if (body.byteOffset % 4 !== 0) return new Float32Array(body.slice().buffer)
  return new Float32Array(body.buffer, body.byteOffset, body.byteLength / 4)
}
