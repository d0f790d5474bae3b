/**
 * Tracing of forward passes in the Chrome Trace Event Format (the JSON Object Format of "Trace Event Format",
 * Google, docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU): complete events (`ph: 'X'`,
 * `ts`/`dur` in µs) plus `process_name` / `thread_name` metadata (`ph: 'M'`). Open a trace in chrome://tracing or
 * ui.perfetto.dev, or draw it with `edgeshard report`.
 *
 * Each peer records spans on its own clock (`performance.now()`, ms) into a {@link TraceRecorder}. The master merges
 * them onto its clock: a worker's time t maps to `t + workerOrigin − masterOrigin − offset`, where the origins are
 * `performance.timeOrigin` (Unix ms) and `offset` is the worker's wall clock minus the master's, estimated from the
 * `trace` request/reply round trip as NTP does (RFC 5905 §8): offset = ((T2 − T1) + (T3 − T4)) / 2 with T1/T4 the
 * master's send/receive times and T2/T3 the worker's receive/send times; an estimate inside its own error bound
 * (± half the round-trip delay) counts as 0. On one machine the offset is ~0.
 *
 * Tracing off costs nothing in the decode loop: the tracer is an optional parameter, `undefined` by default, checked
 * once per span.
 */

/** Span categories (`cat`): colours in the report. */
export type TraceCategory = 'forward' | 'compute' | 'allreduce' | 'io' | 'net' | 'token'

/** Threads (`tid`) of a peer's process: forward-pass work, frames on the wire, the master's tokens. */
export const TRACE_THREADS = { forward: 0, net: 1, token: 2 } as const

/** Receives spans: start and end in ms of the recording process's `performance.now()` clock. */
export interface Tracer {
  span(name: string, cat: TraceCategory, startMs: number, endMs: number, args?: Record<string, unknown>): void
}

/** One recorded span (the tid follows from the category: see {@link TRACE_THREADS}). */
export interface RecordedSpan {
  readonly name: string
  readonly cat: TraceCategory
  readonly startMs: number
  readonly endMs: number
  readonly args?: Record<string, unknown>
}

/** A peer's spans with its clock origin (`performance.timeOrigin`, Unix ms). */
export interface RecordedTrace {
  readonly timeOriginMs: number
  readonly spans: readonly RecordedSpan[]
}

/** One Chrome trace event. */
export interface TraceEvent {
  name: string
  cat?: string
  ph: 'X' | 'M'
  /** µs since the master's time origin. */
  ts: number
  /** µs (`ph: 'X'` only). */
  dur?: number
  pid: number
  tid: number
  args?: Record<string, unknown>
}

/** A trace file: `{ traceEvents, displayTimeUnit, metadata }`. */
export interface ChromeTrace {
  traceEvents: TraceEvent[]
  displayTimeUnit: 'ms'
  metadata: { tool: 'edgeshard'; clock: string; peers: { pid: number; peer: string; role: string; offsetMs: number }[] }
}

/** A tracer that keeps spans in memory until `take()`. */
export class TraceRecorder implements Tracer {
  #spans: RecordedSpan[] = []

  span(name: string, cat: TraceCategory, startMs: number, endMs: number, args?: Record<string, unknown>): void {
    this.#spans.push(args === undefined ? { name, cat, startMs, endMs } : { name, cat, startMs, endMs, args })
  }

  /** Spans recorded so far (then forgotten) with this process's clock origin. */
  take(): RecordedTrace {
    const spans = this.#spans
    this.#spans = []
    return { timeOriginMs: performance.timeOrigin, spans }
  }
}

/** This process's clock as Unix ms (sub-millisecond precision). */
export function wallClockMs(): number {
  return performance.timeOrigin + performance.now()
}

/**
 * The NTP clock offset (remote minus local, ms) from one request/reply: `sentMs`/`receivedMs` local wall clock,
 * `remoteReceivedMs`/`remoteSentMs` the remote's. The estimate is only good to ± half the round-trip delay
 * (RFC 5905 §8), so an estimate within that bound is taken as 0: clocks on one machine (or NTP-synced ones) are not
 * shifted by scheduling noise.
 */
export function clockOffsetMs(sentMs: number, remoteReceivedMs: number, remoteSentMs: number, receivedMs: number): number {
  const offset = (remoteReceivedMs - sentMs + (remoteSentMs - receivedMs)) / 2
  const delay = receivedMs - sentMs - (remoteSentMs - remoteReceivedMs)
  return Math.abs(offset) <= Math.max(0, delay) / 2 ? 0 : offset
}

/** One peer's part of a merged trace. */
export interface PeerTrace {
  /** libp2p peer id (or 'master' for a single-peer cluster). */
  readonly peer: string
  /** `master` or `worker N`. */
  readonly role: string
  readonly trace: RecordedTrace
  /** This peer's wall clock minus the master's, ms (0 for the master). */
  readonly offsetMs: number
}

/**
 * Merges peers' spans onto the master's clock (`peers[0]` is the master): pid i+1 for peer i, named
 * `<role> <peer id>`; µs since the master's time origin.
 */
export function mergeTraces(peers: readonly PeerTrace[]): ChromeTrace {
  const master = peers[0]
  if (!master) throw new RangeError('cannot merge a trace of 0 peers')
  const origin = master.trace.timeOriginMs
  const events: TraceEvent[] = []
  const threadNames: Record<number, string> = { [TRACE_THREADS.forward]: 'forward', [TRACE_THREADS.net]: 'network', [TRACE_THREADS.token]: 'tokens' }
  for (const [i, p] of peers.entries()) {
    const pid = i + 1
    events.push({ name: 'process_name', ph: 'M', ts: 0, pid, tid: 0, args: { name: `${p.role} ${p.peer}` } })
    events.push({ name: 'process_sort_index', ph: 'M', ts: 0, pid, tid: 0, args: { sort_index: pid } })
    const shift = p.trace.timeOriginMs - origin - p.offsetMs
    const tids = new Set<number>()
    for (const s of p.trace.spans) {
      const tid = s.cat === 'net' ? TRACE_THREADS.net : s.cat === 'token' ? TRACE_THREADS.token : TRACE_THREADS.forward
      tids.add(tid)
      const e: TraceEvent = { name: s.name, cat: s.cat, ph: 'X', ts: us(s.startMs + shift), dur: us(Math.max(0, s.endMs - s.startMs)), pid, tid }
      if (s.args) e.args = s.args
      events.push(e)
    }
    for (const tid of [...tids].sort()) events.push({ name: 'thread_name', ph: 'M', ts: 0, pid, tid, args: { name: threadNames[tid] } })
  }
  return {
    traceEvents: events,
    displayTimeUnit: 'ms',
    metadata: {
      tool: 'edgeshard',
      clock: "µs since the master's performance.timeOrigin; workers shifted by their origin and NTP-estimated offset",
      peers: peers.map((p, i) => ({ pid: i + 1, peer: p.peer, role: p.role, offsetMs: p.offsetMs })),
    },
  }
}

/** ms → µs, rounded to 0.001 µs (keeps the JSON short). */
function us(ms: number): number {
  return Math.round(ms * 1e6) / 1e3
}

/**
 * A link (anything with `send(header, body)`) that records each send as a `net` span; for allreduce and forward
 * frames. Use only when tracing: the plain link costs nothing.
 */
export function tracedLink<H extends { type: string }, L extends { send(header: H, body?: ArrayBufferView | null): Promise<void>; readonly peer: string }>(
  link: L,
  tracer: Tracer,
): { send(header: H, body?: ArrayBufferView | null): Promise<void>; readonly peer: string } {
  return {
    peer: link.peer,
    async send(header: H, body?: ArrayBufferView | null): Promise<void> {
      const t0 = performance.now()
      await link.send(header, body)
      tracer.span(`send ${header.type}`, 'net', t0, performance.now(), { to: link.peer, bytes: body?.byteLength ?? 0, ...tagArg(header) })
    },
  }
}

/** Records the arrival of a frame as a zero-length `net` span (the transport does not expose when its first byte came). */
export function traceReceive(tracer: Tracer, header: { type: string }, bytes: number, from: string): void {
  const t = performance.now()
  tracer.span(`recv ${header.type}`, 'net', t, t, { from, bytes, ...tagArg(header) })
}

function tagArg(header: object): Record<string, unknown> {
  const h = header as Record<string, unknown>
  if (typeof h.tag === 'number') return { tag: h.tag }
  if (typeof h.step === 'number') return { step: h.step }
  return {}
}
