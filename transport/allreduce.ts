/**
 * Allreduce (sum of f32 partials) behind one interface, with a star implementation over frames and an in-process
 * one for compute tests.
 *
 * Star allreduce as in TPI-LLM (Li et al. 2024, §3.3 / its code): the master is the hub; each worker sends its partial
 * sum, the master adds its own partial and the workers' partials and sends the sum back — two hops, latency-bound.
 * Wire: worker → hub `{ type: 'ar', tag }` + partial bytes ([n] f32, empty body = no contribution);
 * hub → worker `{ type: 'ar', tag }` + sum bytes ([n] f32). With `wireDtype: 'f16'` the header carries
 * `dtype: 'f16'` and the body is [n] IEEE binary16 (see `f16.ts`: round to nearest even, saturating at ±65504); a
 * receiver decodes whichever dtype a frame declares, so the option is per sender.
 *
 * Determinism: sums are IEEE f32 additions in a fixed order — the hub's own partial first, then members in index
 * order (in-process: member 0, 1, …). Float32Array element updates compute in f64 and round to f32, which equals
 * the correctly rounded f32 sum (53 ≥ 2·24 + 2 bits). With f16 on the wire the members' partials are rounded to f16
 * before the f32 summation and the sum is rounded to f16 once, for every peer including the hub, so all peers still
 * hold bitwise identical sums.
 */
import { logger } from '@libp2p/logger'
import { AllreduceError, FrameError, PeerGoneError, PeerStalledError } from './errors.ts'
import { addF16Into, decodeF16, encodeF16, roundToF16InPlace } from './f16.ts'
import type { Frame, FrameHeader } from './frame.ts'
import { f32Body } from './frame.ts'

const log = logger('edgeshard:transport')

/** Header type of allreduce frames, both directions. */
export const ALLREDUCE_FRAME_TYPE = 'ar'

/**
 * Element type of tensors on the wire: `'f32'` (exact, the default) or `'f16'` (half the bytes; each partial and the
 * sum are rounded to binary16 — relative error ≤ 2^-11 per rounding — and summed in f32).
 */
export type WireDtype = 'f32' | 'f16'

/** Every {@link WireDtype}, the default first (for flag choices and checks of untrusted input). */
export const WIRE_DTYPES: readonly WireDtype[] = ['f32', 'f16']

/** Options of a `StarAllreduceHub`, `StarAllreduceMember` or `createInProcessAllreduce` group. */
export interface StarAllreduceOptions {
  /** Element type this side sends. Default `'f32'`. */
  wireDtype?: WireDtype
  /**
   * Hub only: how long an allreduce waits for the members' partials once the hub has its own, ms; a member still
   * missing then fails the round with PeerStalledError naming it. Default: no deadline.
   */
  deadlineMs?: number
}

function checkWireDtype(dtype: unknown): WireDtype {
  if (dtype === undefined || dtype === 'f32') return 'f32'
  if (dtype === 'f16') return 'f16'
  throw new TypeError(`invalid allreduce wireDtype ${JSON.stringify(dtype)}: must be 'f32' or 'f16'`)
}

function checkDeadline(ms: unknown): number | undefined {
  if (ms === undefined) return undefined
  if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0) throw new TypeError(`invalid allreduce deadlineMs ${JSON.stringify(ms)}: must be a number > 0`)
  return ms
}

function arHeader(tag: number, dtype: WireDtype): FrameHeader {
  return dtype === 'f16' ? { type: ALLREDUCE_FRAME_TYPE, tag, dtype } : { type: ALLREDUCE_FRAME_TYPE, tag }
}

/** Options of one allreduce call. */
export interface AllreduceOptions {
  /** Abandons the wait (the promise rejects with `signal.reason`). */
  signal?: AbortSignal
  /** Hub only: this round's deadline for the members' partials, ms (overrides `StarAllreduceOptions.deadlineMs`). */
  deadlineMs?: number
}

/**
 * One member's view of an allreduce group.
 *
 * Sum `partial` ([n] f32) over all members; every member gets the full sum ([n] f32). `partial === null`: this member
 * contributes nothing at this sync point but still receives the sum. `tag` identifies the sync point (an integer,
 * e.g. `2 * layer + k`); a tag may be reused once its previous round has completed. Do not modify `partial` until the
 * promise settles. The returned array belongs to the caller.
 *
 * @throws AllreduceError (mismatched lengths, a tag already pending for this member, nobody contributed),
 *   PeerGoneError (a member or the hub went away), `signal.reason`
 */
export interface Allreduce {
  allreduce(tag: number, partial: Float32Array | null, opts?: AllreduceOptions): Promise<Float32Array>
}

/** A link to one peer that can carry frames; a `FramedChannel` fits structurally. */
export interface AllreduceLink {
  send(header: FrameHeader, body?: ArrayBufferView | null): Promise<void>
  /** Peer id string of the other end (named in errors). */
  readonly peer: string
}

function checkTag(tag: number): void {
  if (!Number.isSafeInteger(tag)) throw new TypeError(`invalid allreduce tag ${tag}: must be a safe integer`)
}

/** Frame tag of an incoming 'ar' frame. @throws FrameError naming the peer when the tag is not an integer */
function frameTag(frame: Frame, peer: string): number {
  const tag = frame.header.tag
  if (typeof tag !== 'number' || !Number.isSafeInteger(tag)) {
    throw new FrameError(`allreduce frame from peer ${peer} has tag ${String(tag)}: not an integer`)
  }
  return tag
}

/** Values of one wire tensor: [n] f32, or [n] f16 bits. */
type WireValues = Float32Array | Uint16Array

/**
 * Values of an incoming 'ar' frame by its `dtype` (absent = f32): null for an empty body, views without copy.
 * @throws FrameError naming the peer for an unknown dtype or a body that is not a whole number of elements
 */
function frameValues(frame: Frame, peer: string): WireValues | null {
  const { body } = frame
  if (body.byteLength === 0) return null
  const dtype = frame.header.dtype
  if (dtype === 'f16') {
    if (body.byteLength % 2 !== 0) {
      throw new FrameError(`allreduce frame from peer ${peer} has a ${body.byteLength}-byte f16 body: not a multiple of 2`)
    }
    const bytes = body.byteOffset % 2 === 0 ? body : body.slice()
    return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2)
  }
  if (dtype !== undefined && dtype !== 'f32') {
    throw new FrameError(`allreduce frame from peer ${peer} has dtype ${JSON.stringify(dtype)}: expected 'f32' or 'f16'`)
  }
  try {
    return f32Body(frame)
  } catch (err) {
    throw new FrameError(`allreduce frame from peer ${peer}: ${(err as Error).message}`, { cause: err })
  }
}

/** Sum `partials` in order ([n] f32 or f16 each, null = skip) into a new [n] f32 array, f32 additions. */
function sumInOrder(partials: readonly (WireValues | null)[], n: number): Float32Array {
  const out = new Float32Array(n)
  let first = true
  for (const p of partials) {
    if (p === null) continue
    if (p instanceof Uint16Array) {
      if (first) decodeF16(p, out)
      else addF16Into(out, p)
    } else if (first) {
      out.set(p)
    } else {
      for (let k = 0; k < n; k++) out[k]! += p[k]!
    }
    first = false
  }
  return out
}

function waitAbortable<T>(
  signal: AbortSignal | undefined,
  register: (resolve: (v: T) => void, reject: (e: unknown) => void) => void,
  onAbort: () => void,
): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    if (signal === undefined) {
      register(resolve, reject)
      return
    }
    const abort = (): void => {
      onAbort()
      reject(signal.reason)
    }
    register(
      (v) => {
        signal.removeEventListener('abort', abort)
        resolve(v)
      },
      (e) => {
        signal.removeEventListener('abort', abort)
        reject(e)
      },
    )
    signal.addEventListener('abort', abort, { once: true })
  })
}

interface HubRound {
  /** Per member: undefined = not arrived, null = no contribution, else [n] f32 or f16. */
  readonly partials: (WireValues | null | undefined)[]
  arrived: number
  /** Length of the first contribution seen, or -1. */
  length: number
  lengthFrom: string
  error: Error | undefined
  waiter: { own: Float32Array | null; resolve: (sum: Float32Array) => void; reject: (err: unknown) => void } | undefined
}

/**
 * The hub (master) side of the star allreduce. The agent that owns the member channels reads their frames and hands
 * frames of type 'ar' to `deliver(memberIndex, frame)`; partials may arrive before `allreduce` is called for their
 * tag (they are buffered by tag).
 */
export class StarAllreduceHub implements Allreduce {
  private readonly links: readonly AllreduceLink[]
  private readonly wireDtype: WireDtype
  private readonly rounds = new Map<number, HubRound>()
  private readonly deadlineMs: number | undefined
  private failure: PeerGoneError | undefined

  /**
   * @param links - one per worker, in the fixed summation order
   * @param options.wireDtype - element type of the sums sent (default f32); partials are accepted in either
   * @throws TypeError for an unknown wireDtype
   */
  constructor(links: readonly AllreduceLink[], options: StarAllreduceOptions = {}) {
    this.links = [...links]
    this.wireDtype = checkWireDtype(options.wireDtype)
    this.deadlineMs = checkDeadline(options.deadlineMs)
  }

  /**
   * Wait for a partial from every member for `tag`, add them to `own` (hub first, then members in index order),
   * send the sum to every member (one frame each, the same body bytes), and return the sum as the members get it
   * (with f16 on the wire: rounded to f16), in an array of the caller's own.
   * @throws AllreduceError on mismatched lengths (naming the peer and lengths), a duplicate call for a pending tag,
   *   or no contribution at all; PeerGoneError after `fail`; PeerStalledError naming the first member whose partial
   *   is missing at the deadline; a send error; `signal.reason`
   */
  async allreduce(tag: number, own: Float32Array | null, opts: AllreduceOptions = {}): Promise<Float32Array> {
    checkTag(tag)
    opts.signal?.throwIfAborted()
    if (this.failure !== undefined) throw this.failure
    const round = this.round(tag)
    if (round.waiter !== undefined) {
      throw new AllreduceError(`cannot start allreduce for tag ${tag} on the hub: one is already pending`)
    }
    const deadlineMs = checkDeadline(opts.deadlineMs) ?? this.deadlineMs
    let timer: ReturnType<typeof setTimeout> | undefined
    let sum: Float32Array
    try {
      sum = await waitAbortable<Float32Array>(
        opts.signal,
        (resolve, reject) => {
          round.waiter = { own, resolve, reject }
          this.tryComplete(tag, round)
          if (round.waiter !== undefined && deadlineMs !== undefined) {
            timer = setTimeout(() => {
              if (round.waiter === undefined) return
              const missing = round.partials.indexOf(undefined)
              const peer = this.links[missing]?.peer ?? 'unknown'
              round.waiter = undefined
              this.rounds.delete(tag)
              reject(new PeerStalledError(peer, `allreduce member ${missing} (peer ${peer}) sent no partial for tag ${tag} within ${deadlineMs} ms`))
            }, deadlineMs)
          }
        },
        () => {
          round.waiter = undefined
        },
      )
    } finally {
      clearTimeout(timer)
    }
    const header = arHeader(tag, this.wireDtype)
    if (this.wireDtype === 'f16' && this.links.length > 0) {
      const wire = encodeF16(sum) // [n] f16, sent by reference
      decodeF16(wire, sum) // the hub keeps exactly what the members receive
      await Promise.all(this.links.map((link) => link.send(header, wire)))
      return sum
    }
    // members get `sum` by reference; the caller gets its own copy, so modifying it cannot corrupt unsent bytes
    await Promise.all(this.links.map((link) => link.send(header, sum)))
    return sum.slice()
  }

  /**
   * Hand over an 'ar' frame received from member `memberIndex`.
   * @throws RangeError for a bad index; FrameError naming the peer for a non-integer tag or a body that is not a
   *   whole number of f32 (the caller should then abort that member's channel)
   */
  deliver(memberIndex: number, frame: Frame): void {
    const link = this.links[memberIndex]
    if (link === undefined || !Number.isInteger(memberIndex)) {
      throw new RangeError(`allreduce member index ${memberIndex} is outside [0, ${this.links.length})`)
    }
    const tag = frameTag(frame, link.peer)
    const partial = frameValues(frame, link.peer)
    if (this.failure !== undefined) return
    const round = this.round(tag)
    if (round.partials[memberIndex] !== undefined) {
      round.error ??= new AllreduceError(
        `peer ${link.peer} (member ${memberIndex}) sent a second partial for allreduce tag ${tag}`,
      )
    } else {
      round.partials[memberIndex] = partial
      round.arrived++
      if (partial !== null) this.checkLength(tag, round, partial.length, `peer ${link.peer}`)
    }
    this.tryComplete(tag, round)
  }

  /**
   * Member `memberIndex` is gone: reject pending and later allreduces with a PeerGoneError naming its peer.
   * @throws RangeError for a bad index
   */
  fail(memberIndex: number, err: unknown): void {
    const link = this.links[memberIndex]
    if (link === undefined) {
      throw new RangeError(`allreduce member index ${memberIndex} is outside [0, ${this.links.length})`)
    }
    if (this.failure !== undefined) return
    const reason = err instanceof Error ? `${err.name}: ${err.message}` : String(err)
    this.failure = new PeerGoneError(
      link.peer,
      `allreduce member ${memberIndex} (peer ${link.peer}) is gone: ${reason}`,
      { cause: err },
    )
    log.error('%s', this.failure.message)
    for (const round of this.rounds.values()) round.waiter?.reject(this.failure)
    this.rounds.clear()
  }

  private round(tag: number): HubRound {
    let round = this.rounds.get(tag)
    if (round === undefined) {
      round = {
        partials: new Array<Float32Array | null | undefined>(this.links.length).fill(undefined),
        arrived: 0,
        length: -1,
        lengthFrom: '',
        error: undefined,
        waiter: undefined,
      }
      this.rounds.set(tag, round)
    }
    return round
  }

  private checkLength(tag: number, round: HubRound, length: number, from: string): void {
    if (round.length < 0) {
      round.length = length
      round.lengthFrom = from
    } else if (round.length !== length) {
      round.error ??= new AllreduceError(
        `allreduce tag ${tag}: ${from} sent ${length} f32 but ${round.lengthFrom} sent ${round.length}`,
      )
    }
  }

  private tryComplete(tag: number, round: HubRound): void {
    const waiter = round.waiter
    if (waiter === undefined) return
    if (waiter.own !== null && round.length >= 0 && round.length !== waiter.own.length) {
      round.error ??= new AllreduceError(
        `allreduce tag ${tag}: the hub's partial has ${waiter.own.length} f32 but ${round.lengthFrom} sent ${round.length}`,
      )
    }
    if (round.error !== undefined) {
      this.rounds.delete(tag)
      round.waiter = undefined
      waiter.reject(round.error)
      return
    }
    if (round.arrived < this.links.length) return
    this.rounds.delete(tag)
    round.waiter = undefined
    const ordered: (WireValues | null)[] = [waiter.own, ...round.partials.map((p) => p ?? null)]
    const n = waiter.own?.length ?? round.length
    if (n < 0) {
      waiter.reject(new AllreduceError(`allreduce tag ${tag}: no member contributed a partial, length unknown`))
      return
    }
    waiter.resolve(sumInOrder(ordered, n))
  }
}

/**
 * The worker side of the star allreduce: one link to the hub. The agent hands frames of type 'ar' from the hub to
 * `deliver(frame)`.
 */
export class StarAllreduceMember implements Allreduce {
  private readonly link: AllreduceLink
  private readonly wireDtype: WireDtype
  private readonly pending = new Map<
    number,
    { length: number; resolve: (sum: Float32Array) => void; reject: (err: unknown) => void }
  >()
  private failure: PeerGoneError | undefined

  /**
   * @param hub - the link to the hub
   * @param options.wireDtype - element type of the partials sent (default f32); sums are accepted in either
   * @throws TypeError for an unknown wireDtype
   */
  constructor(hub: AllreduceLink, options: StarAllreduceOptions = {}) {
    this.link = hub
    this.wireDtype = checkWireDtype(options.wireDtype)
  }

  /**
   * Send `partial` (empty body for null; with f16 on the wire, its f16 rounding) to the hub with `tag` and wait for
   * the sum with that tag.
   * @throws AllreduceError (tag already pending, sum length differs from the partial's), PeerGoneError after `fail`
   *   or when the send fails because the hub went away, `signal.reason`
   */
  async allreduce(tag: number, partial: Float32Array | null, opts: AllreduceOptions = {}): Promise<Float32Array> {
    checkTag(tag)
    opts.signal?.throwIfAborted()
    if (this.failure !== undefined) throw this.failure
    if (this.pending.has(tag)) {
      throw new AllreduceError(`cannot start allreduce for tag ${tag} towards peer ${this.link.peer}: already pending`)
    }
    // register before sending: the sum can arrive before send() resolves
    const sum = waitAbortable<Float32Array>(
      opts.signal,
      (resolve, reject) => this.pending.set(tag, { length: partial?.length ?? -1, resolve, reject }),
      () => this.pending.delete(tag),
    )
    sum.catch(() => {}) // observed below; avoids an unhandled rejection if the send fails first
    try {
      const body = partial !== null && this.wireDtype === 'f16' ? encodeF16(partial) : partial
      await this.link.send(arHeader(tag, this.wireDtype), body)
    } catch (err) {
      this.pending.delete(tag)
      throw err
    }
    return sum
  }

  /**
   * Hand over an 'ar' frame received from the hub. A sum nobody waits for (e.g. its wait was aborted) is dropped.
   * @throws FrameError naming the hub's peer for a non-integer tag or a body that is not a whole number of f32
   */
  deliver(frame: Frame): void {
    const tag = frameTag(frame, this.link.peer)
    const values = frameValues(frame, this.link.peer) ?? new Float32Array(0)
    const sum = values instanceof Uint16Array ? decodeF16(values) : values
    const waiter = this.pending.get(tag)
    if (waiter === undefined) {
      log('dropping allreduce sum for tag %d from %s: nobody waits for it', tag, this.link.peer)
      return
    }
    this.pending.delete(tag)
    if (waiter.length >= 0 && waiter.length !== sum.length) {
      waiter.reject(
        new AllreduceError(
          `allreduce tag ${tag}: peer ${this.link.peer} sent a sum of ${sum.length} f32 for a partial of ${waiter.length}`,
        ),
      )
      return
    }
    waiter.resolve(sum)
  }

  /** The hub is gone: reject pending and later allreduces with a PeerGoneError naming the hub's peer. */
  fail(err: unknown): void {
    if (this.failure !== undefined) return
    const reason = err instanceof Error ? `${err.name}: ${err.message}` : String(err)
    this.failure = new PeerGoneError(this.link.peer, `allreduce hub (peer ${this.link.peer}) is gone: ${reason}`, {
      cause: err,
    })
    for (const waiter of this.pending.values()) waiter.reject(this.failure)
    this.pending.clear()
  }
}

interface LocalRound {
  readonly partials: (Float32Array | null | undefined)[]
  arrived: number
  readonly waiters: ({ resolve: (sum: Float32Array) => void; reject: (err: unknown) => void } | undefined)[]
}

/**
 * `n` allreduce members in one process, no network, same semantics and summation order as the star (member 0 plays
 * the hub). Each member receives its own copy of the sum. An aborted call withdraws that member's partial.
 * `wireDtype: 'f16'` reproduces the star's f16 wire numerics exactly: members 1… have their partials rounded to f16,
 * the f32 sum is rounded to f16 for everyone.
 * @throws RangeError if `n` is not a positive integer; TypeError for an unknown wireDtype
 */
export function createInProcessAllreduce(n: number, options: StarAllreduceOptions = {}): Allreduce[] {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`cannot create an allreduce group of ${n} members`)
  const wireDtype = checkWireDtype(options.wireDtype)
  const rounds = new Map<number, LocalRound>()

  const complete = (tag: number, round: LocalRound): void => {
    rounds.delete(tag)
    let length = -1
    let lengthFrom = -1
    let error: AllreduceError | undefined
    round.partials.forEach((p, i) => {
      if (p == null) return
      if (length < 0) {
        length = p.length
        lengthFrom = i
      } else if (p.length !== length && error === undefined) {
        error = new AllreduceError(
          `allreduce tag ${tag}: member ${i} has ${p.length} f32 but member ${lengthFrom} has ${length}`,
        )
      }
    })
    if (error === undefined && length < 0) {
      error = new AllreduceError(`allreduce tag ${tag}: no member contributed a partial, length unknown`)
    }
    if (error !== undefined) {
      for (const w of round.waiters) w?.reject(error)
      return
    }
    const sum = sumInOrder(
      round.partials.map((p, i): Float32Array | null => {
        if (p == null || wireDtype === 'f32' || i === 0) return p ?? null
        const rounded = p.slice()
        roundToF16InPlace(rounded)
        return rounded
      }),
      length,
    )
    if (wireDtype === 'f16' && n > 1) roundToF16InPlace(sum)
    round.waiters.forEach((w, i) => {
      w?.resolve(i === 0 ? sum : sum.slice())
    })
  }

  return Array.from({ length: n }, (_, member): Allreduce => ({
    async allreduce(tag, partial, opts = {}) {
      checkTag(tag)
      opts.signal?.throwIfAborted()
      let round = rounds.get(tag)
      if (round === undefined) {
        round = {
          partials: new Array<Float32Array | null | undefined>(n).fill(undefined),
          arrived: 0,
          waiters: new Array(n).fill(undefined),
        }
        rounds.set(tag, round)
      }
      const r = round
      if (r.partials[member] !== undefined) {
        throw new AllreduceError(`cannot start allreduce for tag ${tag} on member ${member}: already pending`)
      }
      return waitAbortable<Float32Array>(
        opts.signal,
        (resolve, reject) => {
          r.partials[member] = partial
          r.waiters[member] = { resolve, reject }
          r.arrived++
          if (r.arrived === n) complete(tag, r)
        },
        () => {
          r.partials[member] = undefined
          r.waiters[member] = undefined
          r.arrived--
        },
      )
    },
  }))
}
