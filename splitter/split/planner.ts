/**
 * The split planner: picks where to cut and how to code the bottleneck from profiles, as Neurosurgeon (Kang et al.
 * 2017, §4.3) picks a partition point from per-layer latency and data-size predictions and BottleFit (Matsubara et al.
 * 2022, §5) compares local computing, edge computing (full offload) and split computing.
 *
 *   total = head (device) + encode (device) + transfer (link) + decode (server) + tail (server)
 *   transfer = rtt + (request bytes + reply bytes) · 8 / bits per second
 *
 * Local-only runs the whole model on the device (no transfer); offload sends the inputs. An option is feasible when
 * its top-1 agreement with the unsplit model on calibration inputs reaches `minAgreement`. The choice is the feasible
 * option of least total time (ties: fewer bytes, then the earlier cut); a device with a memory bound also needs the
 * option's device-side model bytes to fit. Pure: no clocks, no I/O.
 */
import { PlanError } from './errors.ts'

/** A network link: round-trip time and throughput. */
export interface LinkProfile {
  readonly rttMs: number
  readonly bitsPerSecond: number
}

/**
 * A compute device relative to the machine that profiled: every time measured there is multiplied by `slowdown`
 * (2 = twice as slow; 0.5 = twice as fast). `memoryBytes` bounds the model bytes it can hold (heads beyond it are
 * infeasible: the microcontroller case of split computing); absent = unbounded.
 */
export interface DeviceProfile {
  readonly name: string
  readonly slowdown: number
  readonly memoryBytes?: number
}

/** One option to plan: a candidate cut with one bottleneck codec (local-only has no codec). */
export interface SplitOption {
  /** Candidate index (compute nodes on the device). */
  readonly candidate: number
  readonly kind: 'offload' | 'cut' | 'local'
  /** Human label of the cut (e.g. the last head node or the crossing tensors). */
  readonly label: string
  /** Codec name (`q8+deflate`…); '-' for local-only. */
  readonly codec: string
  /** Head time on the profiling machine, ms per request (the whole model for local-only). */
  readonly headMs: number
  /** Encoding the crossing tensors on the profiling machine, ms per request. */
  readonly encodeMs: number
  /** Request payload, bytes (0 for local-only). */
  readonly bytes: number
  /** Reply payload (the outputs), bytes (0 for local-only). */
  readonly replyBytes: number
  /** Decoding on the server, ms per request, as measured where the server profile was taken. */
  readonly decodeMs: number
  /** Tail time on the server, ms per request, as measured there. */
  readonly tailMs: number
  /** Top-1 agreement with the unsplit model on calibration inputs, 0…1. */
  readonly agreement: number
  /** Model bytes the device holds for this option (the head; the whole model for local-only). */
  readonly deviceBytes: number
}

/** An option with its predicted times. */
export interface PlannedOption extends SplitOption {
  readonly deviceMs: number
  readonly transferMs: number
  readonly serverMs: number
  readonly totalMs: number
  /** Meets the agreement bound and fits the device's memory: only feasible options are chosen. */
  readonly feasible: boolean
  /**
   * Fits the device and is not dominated by another option that fits in (total time, bytes, agreement): the trade-off
   * curve, including options below the agreement bound.
   */
  readonly pareto: boolean
}

/** Inputs of {@link planSplit}. */
export interface PlanInput {
  readonly options: readonly SplitOption[]
  readonly link: LinkProfile
  /** The device running heads (default: the profiling machine, slowdown 1). */
  readonly device?: DeviceProfile
  /** The server running tails relative to where its times were measured (default slowdown 1). */
  readonly server?: DeviceProfile
  /** Least top-1 agreement accepted (default 0.99). */
  readonly minAgreement?: number
}

/** A plan: every option with its prediction (fastest first), the choice, and what it assumed. */
export interface SplitPlan {
  readonly rows: readonly PlannedOption[]
  readonly choice: PlannedOption
  readonly link: LinkProfile
  readonly device: DeviceProfile
  readonly server: DeviceProfile
  readonly minAgreement: number
}

const SAME_MACHINE: DeviceProfile = { name: 'this machine', slowdown: 1 }

/** Milliseconds to move `bytes` over `link` and get the reply: one round trip plus serialisation at its rate. */
export function transferMs(bytes: number, link: LinkProfile): number {
  return link.rttMs + (bytes * 8 * 1000) / link.bitsPerSecond
}

function checkLink(link: LinkProfile): void {
  if (!(link.rttMs >= 0) || !(link.bitsPerSecond > 0) || !Number.isFinite(link.rttMs) || !Number.isFinite(link.bitsPerSecond)) {
    throw new RangeError(`invalid link: rtt ${link.rttMs} ms, ${link.bitsPerSecond} bit/s (need rtt ≥ 0 and a positive finite rate)`)
  }
}

function checkDevice(d: DeviceProfile): void {
  if (!(d.slowdown > 0) || !Number.isFinite(d.slowdown)) throw new RangeError(`invalid device ${d.name}: slowdown ${d.slowdown} (need a positive finite factor)`)
}

/** Predicted times of one option. */
export function predict(option: SplitOption, link: LinkProfile, device: DeviceProfile, server: DeviceProfile): Omit<PlannedOption, 'feasible' | 'pareto'> {
  const deviceMs = (option.headMs + option.encodeMs) * device.slowdown
  if (option.kind === 'local') return { ...option, deviceMs, transferMs: 0, serverMs: 0, totalMs: deviceMs }
  const transfer = transferMs(option.bytes + option.replyBytes, link)
  const serverMs = (option.decodeMs + option.tailMs) * server.slowdown
  return { ...option, deviceMs, transferMs: transfer, serverMs, totalMs: deviceMs + transfer + serverMs }
}

function dominates(a: PlannedOption, b: PlannedOption): boolean {
  const noWorse = a.totalMs <= b.totalMs && a.bytes <= b.bytes && a.agreement >= b.agreement
  const better = a.totalMs < b.totalMs || a.bytes < b.bytes || a.agreement > b.agreement
  return noWorse && better
}

/**
 * Plans a split: predicts every option's total time on `link` with `device` and `server`, marks feasibility and the
 * Pareto front, and chooses.
 * @throws RangeError for a bad link, device or agreement bound; PlanError when there is no option or none is
 *   feasible (the message gives the best agreement seen)
 */
export function planSplit(input: PlanInput): SplitPlan {
  const device = input.device ?? SAME_MACHINE
  const server = input.server ?? SAME_MACHINE
  const minAgreement = input.minAgreement ?? 0.99
  checkLink(input.link)
  checkDevice(device)
  checkDevice(server)
  if (!(minAgreement >= 0 && minAgreement <= 1)) throw new RangeError(`invalid minimum agreement ${minAgreement}: must be in [0, 1]`)
  if (input.options.length === 0) throw new PlanError('cannot plan a split: no option was profiled')
  const fits = (o: SplitOption): boolean => device.memoryBytes === undefined || o.deviceBytes <= device.memoryBytes
  const predicted = input.options.map((o) => ({ ...predict(o, input.link, device, server), fits: fits(o), feasible: o.agreement >= minAgreement && fits(o), pareto: false }))
  const feasible = predicted.filter((p) => p.feasible)
  if (feasible.length === 0) {
    const accurate = predicted.filter((p) => p.agreement >= minAgreement)
    if (accurate.length === 0) {
      const best = Math.max(...predicted.map((p) => p.agreement))
      throw new PlanError(`cannot plan a split: no option reaches top-1 agreement ${minAgreement} (best ${best.toFixed(4)}); lower --min-agreement or add a lossless codec`)
    }
    const smallest = Math.min(...accurate.map((p) => p.deviceBytes))
    throw new PlanError(`cannot plan a split: no accurate option fits the device's ${device.memoryBytes} bytes (the smallest head needs ${smallest})`)
  }
  const fitting = predicted.filter((p) => p.fits)
  const rows: PlannedOption[] = predicted.map(({ fits: fitsDevice, ...p }) => ({ ...p, pareto: fitsDevice && !fitting.some((q) => q !== p && dominates(q, p)) }))
  const order = (a: PlannedOption, b: PlannedOption): number => a.totalMs - b.totalMs || a.bytes - b.bytes || a.candidate - b.candidate
  rows.sort(order)
  const choice = rows.find((r) => r.feasible)!
  return { rows, choice, link: input.link, device, server, minAgreement }
}

/**
 * True when `measured` throughput differs from the planned one by more than `fraction` of it (|m − p| / p), or the
 * round trip by more than `fraction` of the planned round trip plus 1 ms: time to plan again.
 */
export function linkMoved(planned: LinkProfile, measured: LinkProfile, fraction: number): boolean {
  if (!(fraction > 0)) throw new RangeError(`invalid re-plan fraction ${fraction}: must be positive`)
  const rate = Math.abs(measured.bitsPerSecond - planned.bitsPerSecond) / planned.bitsPerSecond
  const rtt = Math.abs(measured.rttMs - planned.rttMs) / (planned.rttMs + 1)
  return rate > fraction || rtt > fraction
}

/**
 * Re-plans when the measured link moves: keeps the profiles and the current plan, takes link measurements, and
 * returns a new plan when {@link linkMoved} says so (the new plan's link becomes the reference).
 */
export class Replanner {
  #plan: SplitPlan
  readonly #input: PlanInput
  readonly #fraction: number

  constructor(input: PlanInput, fraction = 0.5) {
    if (!(fraction > 0)) throw new RangeError(`invalid re-plan fraction ${fraction}: must be positive`)
    this.#input = input
    this.#fraction = fraction
    this.#plan = planSplit(input)
  }

  get plan(): SplitPlan {
    return this.#plan
  }

  /** Feeds a link measurement; returns the new plan when the link moved by more than the fraction, else undefined. */
  observe(measured: LinkProfile): SplitPlan | undefined {
    if (!linkMoved(this.#plan.link, measured, this.#fraction)) return undefined
    this.#plan = planSplit({ ...this.#input, link: measured })
    return this.#plan
  }
}
