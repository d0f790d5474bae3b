/**
 * A userspace link emulator: one-way delay plus a rate limit on the frames one side sends over a channel (tc `netem`
 * delay is unavailable on these kernels, see ../shared/NOTES.md; a token bucket of one frame at a time is tc `tbf`
 * with a burst of one frame). Each side shapes what it sends, so shaping both sides emulates a symmetric link.
 *
 * A frame of B bytes queued at time t departs at max(t, previous departure) + B·8/rate and reaches the channel half a
 * round trip later; frames keep their order. Timers give about 1 ms resolution.
 *
 * Two ways in: `ShapedChannel` wraps one channel (split computing), and `LinkShaper` plugged into a node's channels
 * (`FramedChannelOptions.linkShaper`, looked up per remote peer on every send) shapes all traffic to a peer, whatever
 * the protocol (the cluster emulator, `edgeshard emulate`).
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

/**
 * One direction of an emulated link, shared by every channel a process has to one remote peer (so two streams to the
 * same peer share its rate, as on a real link). Reserves the link for each frame: a frame of B bytes queued at time
 * t departs at max(t, previous departure) + B·8/rate and arrives half a round trip later (`performance.now()` ms).
 */
export class LinkShaper {
  readonly link: LinkEmulation
  #lastDepartureMs = 0

  /** @throws RangeError unless the rate is positive and the round trip is not negative */
  constructor(link: LinkEmulation) {
    if (!(link.bitsPerSecond > 0) || !(link.rttMs >= 0)) throw new RangeError(`invalid link emulation: ${link.bitsPerSecond} bit/s, rtt ${link.rttMs} ms`)
    this.link = link
  }

  /** Books the link for a frame of `wireBytes` bytes queued now: when it has left the sender and when it arrives, ms. */
  reserve(wireBytes: number): { readonly departureMs: number; readonly arrivalMs: number } {
    const departureMs = Math.max(performance.now(), this.#lastDepartureMs) + (wireBytes * 8 * 1000) / this.link.bitsPerSecond
    this.#lastDepartureMs = departureMs
    return { departureMs, arrivalMs: departureMs + this.link.rttMs / 2 }
  }
}

/** How late timers fire here, ms: a moving average, so emulated delays aim early by that much. */
let timerLatenessMs = 0.2
/** A wait shorter than this is not worth a timer (they fire ≥ 1 ms late for sub-ms delays): go at once. */
const MIN_TIMER_WAIT_MS = 0.5

/** True when `targetMs` (`performance.now()` clock) is too close for a timer: act now (see {@link sleepUntil}). */
export function isDue(targetMs: number): boolean {
  return targetMs - performance.now() - timerLatenessMs < MIN_TIMER_WAIT_MS
}

/**
 * Resolves at `targetMs` (`performance.now()` clock) as closely as timers allow: aims early by the timers' measured
 * lateness, and resolves at once when less than half a millisecond is left (a timer cannot wait less than 1 ms).
 * Rejects with the signal's reason when it aborts first.
 */
export function sleepUntil(targetMs: number, signal?: AbortSignal): Promise<void> {
  if (isDue(targetMs)) return signal?.aborted ? Promise.reject(signal.reason) : Promise.resolve()
  const waitMs = targetMs - performance.now() - timerLatenessMs
  return new Promise((resolve, reject) => {
    const askedMs = performance.now()
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      const lateMs = performance.now() - askedMs - Math.max(1, waitMs)
      timerLatenessMs = 0.9 * timerLatenessMs + 0.1 * Math.min(5, Math.max(0, lateMs))
      resolve()
    }, waitMs)
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(signal?.reason)
    }
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** The channel operations a shaped or plain channel offers (the subset split computing uses). */
export interface FrameLink {
  readonly remotePeer: string
  send(header: FrameHeader, body?: ArrayBufferView | null, options?: { signal?: AbortSignal }): Promise<void>
  read(options?: { signal?: AbortSignal }): Promise<Frame | null>
  close(): Promise<void>
}

/** Resolves after `ms` (at once for ms ≤ 0); rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
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
