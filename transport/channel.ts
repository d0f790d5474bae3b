/**
 * A framed, ordered, bidirectional channel over one libp2p 3 stream (see `frame.ts` for the wire layout).
 *
 * Lifecycle: `close()` sends a close frame (`{ type: '$close' }`) and then half-closes the stream; the remote's
 * iterator then ends normally. Any other end of the remote's side — a stream reset, a dead connection, or a stream
 * ended without the close frame (e.g. the remote node stopped) — ends the local iterator with a `PeerGoneError`
 * naming the peer. A malformed incoming frame aborts the stream (the remote sees a reset) and ends the local
 * iterator with the `FrameError`. Header types starting with `$` are reserved for such control frames.
 *
 * Nothing here rejects a promise nobody holds: failures surface through `read()`/the iterator, `send()` and
 * `closed` (which carries an internal no-op handler, so it never becomes an unhandled rejection).
 */
import { logger } from '@libp2p/logger'
import { Uint8ArrayList } from 'uint8arraylist'
import { ChannelClosedError, FrameError, PeerGoneError } from './errors.ts'
import type { Frame, FrameHeader, FrameOptions } from './frame.ts'
import { encodeFrame, FrameDecoder } from './frame.ts'
import { isDue, type LinkShaper, sleepUntil } from './link-shaper.ts'

const log = logger('edgeshard:transport')

/** Header type of the control frame `close()` sends before half-closing the stream. */
export const CLOSE_FRAME_TYPE = '$close'

/**
 * Header type of the control frame that precedes each frame sent over an emulated link: its body is the time the next
 * frame reaches the receiver on the emulated link (f64 little-endian, Unix ms with sub-ms precision). The receiver
 * holds that frame until then (see `FramedChannelOptions.linkShaper`).
 */
export const ARRIVAL_FRAME_TYPE = '$at'

/** Longest a receiver holds a frame for its emulated arrival, ms (a bogus arrival time cannot stall a channel longer). */
const MAX_HOLD_MS = 60_000

/**
 * The parts of a libp2p 3 `Stream` a channel uses (structural, so tests or other muxers can supply one).
 * Source: @libp2p/interface `MessageStream` / `Stream`.
 */
export interface ChannelStream extends EventTarget {
  readonly writableNeedsDrain: boolean
  readonly status: string
  readonly readStatus: string
  readonly writeStatus: string
  maxReadBufferLength: number
  send(data: Uint8Array | Uint8ArrayList): boolean
  close(options?: { signal?: AbortSignal }): Promise<void>
  abort(err: Error): void
  pause(): void
  resume(): void
}

/** Who is at the other end: peer id and address as strings (from the libp2p `Connection`). */
export interface ChannelRemote {
  readonly remotePeer: { toString(): string }
  readonly remoteAddr: { toString(): string }
}

/** Options of a `FramedChannel`. */
export interface FramedChannelOptions extends FrameOptions {
  /**
   * Received frames buffered ahead of the consumer before the stream is paused (yamux then stops granting send
   * window, so the remote's `send()` waits), bytes. Default 64 MiB.
   */
  maxQueuedBytes?: number
  /**
   * Link emulation (see `link-shaper.ts`), asked on every `send` for the shaper of the link to the remote peer
   * (undefined = a plain send). A shaped frame is written at once, preceded by a control frame with the time it
   * reaches the receiver on the emulated link (after its serialisation at the link's rate and half the round trip);
   * the receiver holds it until then, so the real stack's own latency and transfer time are part of the emulated ones
   * rather than added to them. `send` resolves when the frame has left at the link's rate. Sender and receiver must
   * share a clock (one machine: `edgeshard emulate`). Default: none.
   */
  linkShaper?: (remotePeer: string) => LinkShaper | undefined
}

interface AbortableOptions {
  signal?: AbortSignal
}

const DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
/**
 * While paused, yamux may still deliver up to its stream window (16 MiB by default) that it granted earlier;
 * libp2p resets a paused stream whose read buffer exceeds `maxReadBufferLength` (default 4 MiB), so raise it.
 */
const PAUSED_READ_BUFFER_BYTES = 32 * 1024 * 1024

type ReadWaiter = { resolve: (frame: Frame | null) => void; reject: (err: Error) => void }

/**
 * One framed channel over one stream. Frames are delivered in order; `send` never copies the body.
 * Single consumer: read with `for await (const frame of channel)` or `read()`, not both at once.
 *
 * @example
 * const channel = await node.dial(addr, TENSOR_PARALLEL_PROTOCOL, { signal: AbortSignal.timeout(5000) })
 * await channel.send({ type: 'ar', tag: 1 }, partial) // partial: [n] f32
 * for await (const frame of channel) use(f32Body(frame))
 */
export class FramedChannel implements AsyncIterable<Frame> {
  /** Peer id string of the remote peer. */
  readonly remotePeer: string
  /** Same as `remotePeer` (so a channel fits `AllreduceLink`). */
  get peer(): string {
    return this.remotePeer
  }

  /** Multiaddr string of the remote end of the connection. */
  readonly remoteAddr: string
  /**
   * Settles once the stream has ended: resolves after a graceful close of both sides, rejects with the error that
   * ended it (PeerGoneError, FrameError, the `abort` reason). Safe to ignore.
   */
  readonly closed: Promise<void>

  private readonly stream: ChannelStream
  private readonly decoder: FrameDecoder
  private readonly encodeOptions: FrameOptions
  private readonly maxQueuedBytes: number
  private readonly linkShaper: ((remotePeer: string) => LinkShaper | undefined) | undefined
  /** Bytes of an arrival control frame (constant: its time travels in an 8-byte body). */
  private arrivalFrameBytes = 0
  /** Arrival time (local `performance.now()` ms) announced for the next frame, if any. */
  private nextArrivalMs: number | undefined
  /** Frames held until their emulated arrival, in order, and whether a timer waits for the first. */
  private readonly held: { frame: Frame; atMs: number }[] = []
  private heldBytes = 0
  private holding = false
  /** How the read side ended while frames were still held (applied once they are delivered). */
  private deferredEnd: { error: Error | undefined } | undefined
  private readonly queue: Frame[] = []
  private queueHead = 0
  private queuedBytes = 0
  /** Bytes written to the stream (frame prefixes, headers and bodies) since the channel opened. */
  bytesSent = 0
  /** Bytes read from the stream since the channel opened. */
  bytesReceived = 0
  private paused = false
  private waiter: ReadWaiter | undefined
  /** Set once no more frames will be read: `error` undefined = graceful end. */
  private readEnd: { error: Error | undefined } | undefined
  /** Set once nothing more may be sent. */
  private writeEnd: Error | undefined
  private remoteSaidClose = false
  private abortedLocally = false
  private closing: Promise<void> | undefined
  private settleClosed!: (err?: Error) => void

  constructor(stream: ChannelStream, remote: ChannelRemote, options: FramedChannelOptions = {}) {
    this.stream = stream
    this.remotePeer = remote.remotePeer.toString()
    this.remoteAddr = remote.remoteAddr.toString()
    this.encodeOptions = {
      ...(options.maxFrameBytes === undefined ? {} : { maxFrameBytes: options.maxFrameBytes }),
      ...(options.frameStartOffset === undefined ? {} : { frameStartOffset: options.frameStartOffset }),
    }
    this.decoder = new FrameDecoder(options.maxFrameBytes === undefined ? {} : { maxFrameBytes: options.maxFrameBytes })
    this.maxQueuedBytes = options.maxQueuedBytes ?? DEFAULT_MAX_QUEUED_BYTES
    this.linkShaper = options.linkShaper
    this.closed = new Promise<void>((resolve, reject) => {
      this.settleClosed = (err) => (err === undefined ? resolve() : reject(err))
    })
    this.closed.catch(() => {})
    stream.maxReadBufferLength = Math.max(stream.maxReadBufferLength, PAUSED_READ_BUFFER_BYTES)
    stream.addEventListener('message', this.onMessage)
    stream.addEventListener('remoteCloseWrite', this.onRemoteCloseWrite)
    stream.addEventListener('close', this.onClose)
    if (stream.status !== 'open') {
      // already finished before we attached (e.g. reset during protocol negotiation)
      this.onClose(new Event('close'))
    }
  }

  /**
   * Send one frame: header and body back to back in one stream write, the body by reference (do not modify it
   * until the promise resolves). Waits first while the stream's send buffer is full, and resolves once the stream
   * can take more (backpressure). Concurrent sends are allowed; each frame stays contiguous.
   *
   * @param header - plain object with a string `type` not starting with `$`
   * @param body - raw bytes or a typed array (e.g. [n] f32), optional
   * @throws TypeError on a bad header; FrameError if the frame is over a cap; the error that ended the channel
   *   (PeerGoneError, FrameError, ...) or ChannelClosedError after `close()`/`abort()`; `signal.reason` on abort
   */
  async send(header: FrameHeader, body?: ArrayBufferView | null, options: AbortableOptions = {}): Promise<void> {
    if (typeof header?.type === 'string' && header.type.startsWith('$')) {
      throw new TypeError(`cannot send frame of type '${header.type}': types starting with '$' are reserved`)
    }
    const shaper = this.linkShaper?.(this.remotePeer)
    if (shaper !== undefined) {
      await this.sendShaped(shaper, header, body, options.signal)
      return
    }
    const parts = encodeFrame(header, body, this.encodeOptions)
    await this.write(parts, options.signal, false)
  }

  /**
   * Send over an emulated link: the arrival control frame and the frame in one stream write (the frame's body still
   * 8-byte aligned for the receiver), then wait until the frame has left at the link's rate.
   */
  private async sendShaped(shaper: LinkShaper, header: FrameHeader, body: ArrayBufferView | null | undefined, signal: AbortSignal | undefined): Promise<void> {
    const at = new Uint8Array(8)
    if (this.arrivalFrameBytes === 0) this.arrivalFrameBytes = encodeFrame({ type: ARRIVAL_FRAME_TYPE }, at, this.encodeOptions).reduce((n, p) => n + p.byteLength, 0)
    const parts = encodeFrame(header, body, { ...this.encodeOptions, frameStartOffset: (this.encodeOptions.frameStartOffset ?? 0) + this.arrivalFrameBytes })
    const { departureMs, arrivalMs } = shaper.reserve(parts.reduce((n, p) => n + p.byteLength, 0))
    new DataView(at.buffer).setFloat64(0, performance.timeOrigin + arrivalMs, true)
    await this.write([...encodeFrame({ type: ARRIVAL_FRAME_TYPE }, at, this.encodeOptions), ...parts], signal, false)
    await sleepUntil(departureMs, signal)
  }

  /** Write one frame's parts in one stream write; `closeFrame` = the close frame itself, sent while closing. */
  private async write(parts: Uint8Array[], signal: AbortSignal | undefined, closeFrame: boolean): Promise<void> {
    signal?.throwIfAborted()
    this.checkWritable(closeFrame)
    if (this.stream.writableNeedsDrain) {
      await this.waitForDrain(signal)
      this.checkWritable(closeFrame)
    }
    let canSendMore: boolean
    for (const part of parts) this.bytesSent += part.byteLength
    try {
      canSendMore = this.stream.send(parts.length === 1 ? parts[0]! : new Uint8ArrayList(...parts))
    } catch (err) {
      throw this.writeEnd ?? this.peerGone('send failed', err)
    }
    if (!canSendMore) await this.waitForDrain(signal)
  }

  private checkWritable(closeFrame: boolean): void {
    if (this.writeEnd !== undefined) throw this.writeEnd
    if (this.closing !== undefined && !closeFrame) {
      throw new ChannelClosedError(`cannot send to peer ${this.remotePeer}: channel is closing`)
    }
    if (this.stream.writeStatus !== 'writable') {
      throw new ChannelClosedError(`cannot send to peer ${this.remotePeer}: stream is ${this.stream.writeStatus}`)
    }
  }

  /**
   * Wait until the stream no longer needs a drain. Own loop over 'drain' events: in @libp2p/utils 7.4
   * `stream.onDrain()` keeps resolving immediately after the first drain (its `onDrainPromise` is never reset).
   */
  private async waitForDrain(signal: AbortSignal | undefined): Promise<void> {
    while (this.stream.writableNeedsDrain) {
      if (this.writeEnd !== undefined) throw this.writeEnd
      await new Promise<void>((resolve, reject) => {
        const cleanup = (): void => {
          this.stream.removeEventListener('drain', onDrain)
          this.stream.removeEventListener('close', onClose)
          signal?.removeEventListener('abort', onAbort)
        }
        const onDrain = (): void => {
          cleanup()
          resolve()
        }
        const onClose = (): void => {
          cleanup()
          reject(this.writeEnd ?? new ChannelClosedError(`stream to peer ${this.remotePeer} closed while sending`))
        }
        const onAbort = (): void => {
          cleanup()
          reject(signal?.reason)
        }
        this.stream.addEventListener('drain', onDrain)
        this.stream.addEventListener('close', onClose)
        signal?.addEventListener('abort', onAbort)
        if (signal?.aborted === true) onAbort()
      })
    }
  }

  /**
   * The next frame, or `null` once the remote has closed the channel gracefully.
   * @throws PeerGoneError (remote reset, connection lost, ended without close frame), FrameError (malformed
   *   incoming frame), the `abort` reason, `signal.reason`; TypeError if another read is pending
   */
  async read(options: AbortableOptions = {}): Promise<Frame | null> {
    if (this.waiter !== undefined) {
      throw new TypeError(`cannot read from channel to peer ${this.remotePeer}: another read is pending (single consumer)`)
    }
    const signal = options.signal
    signal?.throwIfAborted()
    const frame = this.dequeue()
    if (frame !== undefined) return frame
    if (this.readEnd !== undefined) {
      if (this.readEnd.error !== undefined) throw this.readEnd.error
      return null
    }
    return new Promise<Frame | null>((resolve, reject) => {
      const onAbort = (): void => {
        this.waiter = undefined
        reject(signal?.reason)
      }
      this.waiter = {
        resolve: (f) => {
          signal?.removeEventListener('abort', onAbort)
          resolve(f)
        },
        reject: (err) => {
          signal?.removeEventListener('abort', onAbort)
          reject(err)
        },
      }
      signal?.addEventListener('abort', onAbort, { once: true })
    })
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Frame> {
    for (;;) {
      const frame = await this.read()
      if (frame === null) return
      yield frame
    }
  }

  /**
   * Graceful close of our side: send the close frame, flush, half-close the stream. Frames from the remote can
   * still be read until it closes too. Idempotent.
   * @throws the error that ended the channel if it died meanwhile; `signal.reason` on abort (the stream is then
   *   aborted)
   */
  close(options: AbortableOptions = {}): Promise<void> {
    if (this.closing !== undefined) return this.closing
    if (this.writeEnd !== undefined) return Promise.resolve()
    this.closing = (async () => {
      try {
        await this.write(encodeFrame({ type: CLOSE_FRAME_TYPE }), options.signal, true)
        this.writeEnd = new ChannelClosedError(`cannot send to peer ${this.remotePeer}: channel closed locally`)
        await this.stream.close(options.signal === undefined ? {} : { signal: options.signal })
      } catch (err) {
        const error = err instanceof Error ? err : new ChannelClosedError(`close failed: ${String(err)}`)
        this.abort(error)
        throw error
      }
    })()
    return this.closing
  }

  /** Abort both directions at once: unsent/unread data is discarded, the remote sees a reset. Idempotent. */
  abort(err: Error): void {
    if (this.abortedLocally) return
    this.abortedLocally = true
    this.writeEnd ??= err
    this.endRead(err)
    try {
      this.stream.abort(err)
    } catch (abortErr) {
      log.error('aborting stream to %s threw - %e', this.remotePeer, abortErr)
    }
    this.settleClosed(err)
  }

  private readonly onMessage = (evt: Event): void => {
    if (this.readEnd !== undefined) return
    const data = (evt as Event & { data: Uint8Array | Uint8ArrayList }).data
    let frames: Frame[]
    this.bytesReceived += data.byteLength
    try {
      frames = this.decoder.push(data)
    } catch (err) {
      const error = err instanceof FrameError ? err : new FrameError(String(err), { cause: err })
      log.error('malformed frame from %s, aborting stream - %s', this.remotePeer, error.message)
      this.abort(error)
      return
    }
    for (const frame of frames) {
      if (this.remoteSaidClose) {
        this.abort(new FrameError(`peer ${this.remotePeer} sent a '${frame.header.type}' frame after its close frame`))
        return
      }
      if (frame.header.type === CLOSE_FRAME_TYPE) {
        this.remoteSaidClose = true
        continue
      }
      if (frame.header.type === ARRIVAL_FRAME_TYPE) {
        if (frame.body.byteLength !== 8) {
          this.abort(new FrameError(`peer ${this.remotePeer} sent an arrival frame of ${frame.body.byteLength} bytes, expected 8`))
          return
        }
        const atMs = new DataView(frame.body.buffer, frame.body.byteOffset, 8).getFloat64(0, true) - performance.timeOrigin
        this.nextArrivalMs = Number.isFinite(atMs) ? Math.min(atMs, performance.now() + MAX_HOLD_MS) : undefined
        continue
      }
      // Arrival times are honoured only where this side emulates the link too (never on a plain agent).
      const atMs = this.linkShaper?.(this.remotePeer) === undefined ? undefined : this.nextArrivalMs
      this.nextArrivalMs = undefined
      if (this.held.length > 0 || (atMs !== undefined && !isDue(atMs))) {
        this.held.push({ frame, atMs: atMs ?? 0 })
        this.heldBytes += frame.body.byteLength
        this.pauseIfFull()
        this.releaseHeld()
        continue
      }
      this.enqueue(frame)
    }
    if (this.remoteSaidClose && this.decoder.idle) this.endRead(undefined)
  }

  private readonly onRemoteCloseWrite = (): void => {
    // yamux handles a FIN flag before the data of the same frame: decide once that data has been dispatched
    queueMicrotask(() => {
      if (this.readEnd !== undefined) return
      if (this.remoteSaidClose && this.decoder.idle) {
        this.endRead(undefined)
        return
      }
      const partial = this.decoder.bufferedBytes
      this.endRead(
        this.peerGone(
          partial > 0
            ? `ended the stream in the middle of a frame (${partial} bytes buffered)`
            : 'ended the stream without closing the channel',
          undefined,
        ),
      )
    })
  }

  private readonly onClose = (evt: Event): void => {
    const error = (evt as Event & { error?: Error }).error
    if (this.abortedLocally) return // abort() already recorded its reason
    if (error !== undefined) {
      // a remote reset, or the connection died (libp2p then aborts the stream "locally" with the transport error)
      this.finish(this.peerGone('reset the stream or lost the connection', error))
      return
    }
    // nothing can be sent any more; if we did not close our side, the remote end or the transport did
    this.writeEnd ??= this.peerGone('closed the stream', undefined)
    queueMicrotask(() => {
      const graceful = this.readEnd === undefined ? this.remoteSaidClose && this.decoder.idle : this.readEnd.error === undefined
      this.finish(graceful ? undefined : this.peerGone('closed the stream without closing the channel', undefined))
    })
  }

  /** The stream is over: nothing more is sent or read; settle `closed`. */
  private finish(error: Error | undefined): void {
    this.writeEnd ??= error ?? new ChannelClosedError(`cannot send to peer ${this.remotePeer}: stream closed`)
    this.endRead(error)
    this.settleClosed(this.readEnd?.error ?? error)
  }

  private peerGone(what: string, cause: unknown): PeerGoneError {
    const reason = cause instanceof Error ? `: ${cause.name}: ${cause.message}` : ''
    return new PeerGoneError(
      this.remotePeer,
      `peer ${this.remotePeer} ${what}${reason}`,
      cause === undefined ? undefined : { cause },
    )
  }

  private enqueue(frame: Frame): void {
    if (this.waiter !== undefined) {
      const waiter = this.waiter
      this.waiter = undefined
      waiter.resolve(frame)
      return
    }
    this.queue.push(frame)
    this.queuedBytes += frame.body.byteLength
    this.pauseIfFull()
  }

  /** Pauses the stream while the frames queued and held for their emulated arrival exceed the cap. */
  private pauseIfFull(): void {
    if (!this.paused && this.queuedBytes + this.heldBytes > this.maxQueuedBytes && this.stream.readStatus === 'readable') {
      this.paused = true
      this.stream.pause()
    }
  }

  private dequeue(): Frame | undefined {
    if (this.queueHead === this.queue.length) return undefined
    const frame = this.queue[this.queueHead]!
    this.queue[this.queueHead] = undefined as unknown as Frame
    this.queueHead++
    if (this.queueHead === this.queue.length) {
      this.queue.length = 0
      this.queueHead = 0
    } else if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue.splice(0, this.queueHead)
      this.queueHead = 0
    }
    this.queuedBytes -= frame.body.byteLength
    this.resumeIfRoom()
    return frame
  }

  /** Resumes a paused stream once the frames queued and held are down to half the cap. */
  private resumeIfRoom(): void {
    if (this.paused && this.queuedBytes + this.heldBytes <= this.maxQueuedBytes / 2) {
      this.paused = false
      if (this.stream.readStatus === 'paused') this.stream.resume()
    }
  }

  /** Delivers the held frames whose emulated arrival has come, in order; waits for the next one; then any deferred end. */
  private releaseHeld(): void {
    if (this.holding) return
    while (this.held.length > 0 && isDue(this.held[0]!.atMs)) {
      const { frame } = this.held.shift()!
      this.heldBytes -= frame.body.byteLength
      this.enqueue(frame)
    }
    this.resumeIfRoom()
    if (this.held.length > 0) {
      this.holding = true
      void sleepUntil(this.held[0]!.atMs).then(() => {
        this.holding = false
        if (this.readEnd === undefined) this.releaseHeld()
      })
    } else if (this.deferredEnd !== undefined) {
      this.endRead(this.deferredEnd.error)
    }
  }

  private endRead(error: Error | undefined): void {
    if (this.readEnd !== undefined) return
    if (this.held.length > 0 && !this.abortedLocally) {
      // frames still crossing the emulated link arrive first, as they would on a real one
      this.deferredEnd ??= { error }
      return
    }
    this.readEnd = { error }
    if (error !== undefined) {
      // frames already queued are still delivered before the error; drop nothing here
      log('channel to %s ended - %s', this.remotePeer, error.message)
    }
    const waiter = this.waiter
    this.waiter = undefined
    if (waiter !== undefined) {
      if (error === undefined) waiter.resolve(null)
      else waiter.reject(error)
    }
  }
}
