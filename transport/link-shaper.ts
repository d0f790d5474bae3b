/**
 * A userspace link emulator: one-way delay plus a rate limit on the frames one side sends over a channel (tc `netem`
 * delay is unavailable on these kernels, see ../shared/NOTES.md; a token bucket of one frame at a time is tc `tbf`
 * with a burst of one frame). Each side shapes what it sends, so shaping both sides emulates a symmetric link.
 *
 * A frame of B bytes queued at time t departs at max(t, previous departure) + B·8/rate and reaches the channel half a
 * round trip later; frames keep their order. Timers give about 1 ms resolution.
 */
import type { FramedChannel } from './channel.ts'
import type { Frame, FrameHeader } from './frame.ts'
import { encodeFrame } from './frame.ts'

/** Link parameters: round-trip time (half of it is added to each direction) and rate. */
export interface LinkEmulation {
  readonly rttMs: number
  readonly bitsPerSecond: number
}

/**
 * Parses `<rate>:<rtt>`, e.g. `1mbit:20ms`, `1gbit:1ms`, `500kbit:80ms` (rate units bit, kbit, mbit, gbit; decimal).
 * @throws RangeError naming the text
 */
export function parseLinkEmulation(text: string): LinkEmulation {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)(?:\/s)?\s*:\s*(\d+(?:\.\d+)?)\s*ms\s*$/i.exec(text)
  if (!m) throw new RangeError(`invalid link '${text}': expected <rate>:<rtt> such as 1mbit:20ms or 1gbit:1ms`)
  const scale = { bit: 1, kbit: 1e3, mbit: 1e6, gbit: 1e9 }[m[2]!.toLowerCase() as 'bit']
  const bitsPerSecond = Number(m[1]) * scale
  if (!(bitsPerSecond > 0)) throw new RangeError(`invalid link '${text}': the rate must be positive`)
  return { rttMs: Number(m[3]), bitsPerSecond }
}

/** The channel operations a shaped or plain channel offers (the subset split computing uses). */
export interface FrameLink {
  readonly remotePeer: string
  send(header: FrameHeader, body?: ArrayBufferView | null, options?: { signal?: AbortSignal }): Promise<void>
  read(options?: { signal?: AbortSignal }): Promise<Frame | null>
  close(): Promise<void>
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (ms <= 0) return Promise.resolve()
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(signal?.reason)
    }
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/**
 * A channel whose sends go through an emulated link. `send` resolves once the frame has been handed to the real
 * channel (after its serialisation time and the one-way delay); `read` and `close` pass through.
 */
export class ShapedChannel implements FrameLink {
  readonly #channel: FramedChannel
  readonly #link: LinkEmulation
  #lastDepartureMs = 0
  #tail: Promise<void> = Promise.resolve()

  constructor(channel: FramedChannel, link: LinkEmulation) {
    if (!(link.bitsPerSecond > 0) || !(link.rttMs >= 0)) throw new RangeError(`invalid link emulation: ${link.bitsPerSecond} bit/s, rtt ${link.rttMs} ms`)
    this.#channel = channel
    this.#link = link
  }

  get remotePeer(): string {
    return this.#channel.remotePeer
  }

  get link(): LinkEmulation {
    return this.#link
  }

  async send(header: FrameHeader, body?: ArrayBufferView | null, options: { signal?: AbortSignal } = {}): Promise<void> {
    const wireBytes = encodeFrame(header, body).reduce((n, part) => n + part.byteLength, 0)
    const now = performance.now()
    const departure = Math.max(now, this.#lastDepartureMs) + (wireBytes * 8 * 1000) / this.#link.bitsPerSecond
    this.#lastDepartureMs = departure
    const arrival = departure + this.#link.rttMs / 2
    const previous = this.#tail
    const delivered = (async () => {
      await previous.catch(() => {})
      await sleep(arrival - performance.now(), options.signal)
      await this.#channel.send(header, body, options)
    })()
    this.#tail = delivered
    await delivered
  }

  read(options: { signal?: AbortSignal } = {}): Promise<Frame | null> {
    return this.#channel.read(options)
  }

  close(): Promise<void> {
    return this.#channel.close()
  }
}
