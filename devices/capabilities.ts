/**
 * What a device can do for LLM inference, as numbers a planner can use (units in every name), and what a link between
 * two devices can carry. Shared by the profiles of real devices (profiles.ts), cluster files (cluster-file.ts) and the
 * measurement an agent publishes (agent/device-measure.ts).
 */

/**
 * Capabilities of one device. Decode (one token at a time) is memory bound: a matrix-vector product reads every weight
 * once, so its time is weight bytes / `decodeGBs` (TPI-LLM §2, llama.cpp's "tokens/s ≈ bandwidth / model bytes").
 * Prefill (a prompt of many tokens) is compute bound: `prefillGflops`.
 */
export interface DeviceCapabilities {
  /** Memory the agent may use for weights, KV cache and runtime, bytes (a profile: the device's RAM). */
  readonly memoryBytes: number
  /** Cores the agent may use; fractional under a cgroup CPU quota (e.g. 0.25). */
  readonly cores: number
  /** Decode-size matrix-vector rate with dense f32 weights: weight bytes read per second, GB/s (1e9 bytes/s). */
  readonly decodeGBs: number
  /**
   * The same for 4-bit block-quantized weights (onnxruntime MatMulNBits: blob + scales bytes per second), GB/s.
   * Absent: assume `decodeGBs`.
   */
  readonly decodeNBitsGBs?: number
  /** Prefill-size matrix-matrix rate (e.g. [64, 2048] × [2048, 2048] f32), GFLOP/s (1e9 multiply-adds × 2 per s). */
  readonly prefillGflops: number
  /** Sequential read rate of the disk shard files live on, MB/s (1e6 bytes/s). */
  readonly diskReadMBs: number
  /**
   * Fixed cost of one decode block (attention or FFN) beyond reading its weights, ms: session run, norms, RoPE,
   * attention over the cache. Absent: the planner's default.
   */
  readonly blockOverheadMs?: number
  /** CPU time per message sent or received (framing, encryption, copies), beyond the link's round trip, ms. Absent: 0. */
  readonly messageOverheadMs?: number
}

/** One direction of a link between two devices, as the application sees it (TCP payload). */
export interface LinkCapabilities {
  /** Round-trip time of a small message, ms. */
  readonly rttMs: number
  /** Sustained throughput, Mbit/s (1e6 bits/s). */
  readonly mbps: number
}

/** Fields of {@link DeviceCapabilities}, required ones first. */
export const CAPABILITY_FIELDS = [
  'memoryBytes',
  'cores',
  'decodeGBs',
  'prefillGflops',
  'diskReadMBs',
  'decodeNBitsGBs',
  'blockOverheadMs',
  'messageOverheadMs',
] as const

const REQUIRED = new Set<string>(['memoryBytes', 'cores', 'decodeGBs', 'prefillGflops', 'diskReadMBs'])

/** Reports a problem with `field` of a capabilities object; must throw. */
export type CapabilityProblem = (field: string, detail: string) => never

function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)
  if (value === null || typeof value !== 'object') return String(value)
  return Array.isArray(value) ? 'an array' : 'an object'
}

/**
 * Checks an untrusted capabilities object (JSON from a cluster file, a cache file or a peer) field by field: every
 * required field a finite number > 0, `decodeNBitsGBs` absent or the same, `blockOverheadMs` and `messageOverheadMs`
 * absent or a finite number ≥ 0, no other fields.
 * @param fail - called with the field and what is wrong; default throws RangeError `capabilities.<field>: ...`
 * @returns a fresh object with exactly the known fields
 */
export function parseCapabilities(value: unknown, fail?: CapabilityProblem): DeviceCapabilities {
  const problem: CapabilityProblem =
    fail ??
    ((field, detail) => {
      throw new RangeError(`capabilities${field === '' ? '' : `.${field}`}: ${detail}`)
    })
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    problem('', `expected an object with ${[...REQUIRED].join(', ')}, got ${describe(value)}`)
  }
  const v = value as Record<string, unknown>
  for (const key of Object.keys(v)) {
    if (!(CAPABILITY_FIELDS as readonly string[]).includes(key)) problem(key, `unknown field (known: ${CAPABILITY_FIELDS.join(', ')})`)
  }
  const number = (key: string, orZero = false): number | undefined => {
    const x = v[key]
    if (x === undefined && !REQUIRED.has(key)) return undefined
    if (typeof x !== 'number' || !Number.isFinite(x) || x < 0 || (x === 0 && !orZero)) problem(key, `expected a number ${orZero ? '≥' : '>'} 0, got ${describe(x)}`)
    return x as number
  }
  const nbits = number('decodeNBitsGBs')
  const blockOverheadMs = number('blockOverheadMs', true)
  const messageOverheadMs = number('messageOverheadMs', true)
  return {
    memoryBytes: number('memoryBytes')!,
    cores: number('cores')!,
    decodeGBs: number('decodeGBs')!,
    ...(nbits === undefined ? {} : { decodeNBitsGBs: nbits }),
    prefillGflops: number('prefillGflops')!,
    diskReadMBs: number('diskReadMBs')!,
    ...(blockOverheadMs === undefined ? {} : { blockOverheadMs }),
    ...(messageOverheadMs === undefined ? {} : { messageOverheadMs }),
  }
}

/**
 * Checks an untrusted link object: `rttMs` a finite number ≥ 0, `mbps` a finite number > 0.
 * @param fail - as for {@link parseCapabilities}; default throws RangeError `link.<field>: ...`
 */
export function parseLink(value: unknown, fail?: CapabilityProblem): LinkCapabilities {
  const problem: CapabilityProblem =
    fail ??
    ((field, detail) => {
      throw new RangeError(`link${field === '' ? '' : `.${field}`}: ${detail}`)
    })
  if (typeof value !== 'object' || value === null || Array.isArray(value)) problem('', `expected an object { rttMs, mbps }, got ${describe(value)}`)
  const v = value as Record<string, unknown>
  if (typeof v.rttMs !== 'number' || !Number.isFinite(v.rttMs) || v.rttMs < 0) problem('rttMs', `expected a number ≥ 0, got ${describe(v.rttMs)}`)
  if (typeof v.mbps !== 'number' || !Number.isFinite(v.mbps) || v.mbps <= 0) problem('mbps', `expected a number > 0, got ${describe(v.mbps)}`)
  return { rttMs: v.rttMs as number, mbps: v.mbps as number }
}

/** Used in messages: a JSON value described briefly (`"abc"`, `12`, `an object`). */
export function describeValue(value: unknown): string {
  return describe(value)
}
