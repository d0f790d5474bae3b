/**
 * The info protocol (`/edgeshard/info/1.0.0`, see transport/protocols.ts): every agent answers `{ type: 'info' }`
 * frames with its device profile, so a master or `edgeshard peers` can list agents and time round trips to them.
 */
import { randomBytes } from 'node:crypto'
import { arch, cpus, freemem, hostname, loadavg, platform, totalmem } from 'node:os'
import { type DeviceCapabilities, parseCapabilities } from '../devices/index.ts'
import { type FramedChannel, INFO_PROTOCOL, type TransportNode } from '../transport/index.ts'
import { availableMemoryBytes } from './device-measure.ts'
import { ProtocolError } from './protocol.ts'
import { runtimeVersion } from './runtime.ts'

/** Random id of this process (16 hex digits): tells two agents that share a peer id (a copied key) apart. */
const INSTANCE = randomBytes(8).toString('hex')

/** What an agent tells about its device. Memory in bytes. */
export interface DeviceProfile {
  readonly hostname: string
  /** `platform-arch`, e.g. `linux-arm64`. */
  readonly platform: string
  /** Logical cores. */
  readonly cores: number
  readonly totalMemoryBytes: number
  /** Memory available to new work (libuv: MemAvailable on Linux). */
  readonly freeMemoryBytes: number
  /** 1-minute load average (0 where the OS has none). */
  readonly loadAverage: number
  readonly nodeVersion: string
  /** onnxruntime-node version. */
  readonly ortVersion: string
  /** True while the agent serves a master (it would refuse none, but shares its cores). */
  readonly busy: boolean
  /** Random id of the agent's process, new on every start (absent from older agents). */
  readonly instance?: string
  /**
   * What the agent measured with the real kernels (`edgeshard profile`, agent/device-measure.ts): decode GB/s, prefill
   * GFLOP/s, disk MB/s, memory and cores. Absent until the agent has measured or loaded its cached measurement.
   */
  readonly measured?: DeviceCapabilities
}

/** The measurement this process publishes in its profile (set once measured or loaded from the cache). */
let published: DeviceCapabilities | undefined

/**
 * Sets the measured capabilities every later {@link deviceProfile} carries (memory refreshed on each call).
 * `undefined` withdraws them.
 */
export function publishMeasuredCapabilities(capabilities: DeviceCapabilities | undefined): void {
  published = capabilities
}

/** An agent that answered the info protocol: where it was reached, its profile, and the measured round trip. */
export interface AgentProbe {
  readonly peer: string
  /** The multiaddr that answered (with `/p2p/<peer id>`). */
  readonly address: string
  readonly profile: DeviceProfile
  /** Median round trip of an info request on an open stream, ms (the first, which opens the stream, excluded). */
  readonly rttMs: number
}

/** This device's profile. */
export function deviceProfile(busy: boolean): DeviceProfile {
  return {
    hostname: hostname(),
    platform: `${platform()}-${arch()}`,
    cores: cpus().length,
    totalMemoryBytes: totalmem(),
    freeMemoryBytes: freemem(),
    loadAverage: loadavg()[0] ?? 0,
    nodeVersion: process.versions.node,
    ortVersion: runtimeVersion(),
    busy,
    instance: INSTANCE,
    ...(published ? { measured: { ...published, memoryBytes: availableMemoryBytes().availableBytes } } : {}),
  }
}

/**
 * Answers every `info` frame on `channel` with `profile()` until the dialler closes the stream. A frame's body is
 * ignored: the link probe (agent/link-probe.ts) sends megabytes in it to time the link's throughput.
 */
export async function answerInfo(channel: FramedChannel, profile: () => DeviceProfile): Promise<void> {
  for await (const frame of channel) {
    if (frame.header.type !== 'info') throw new ProtocolError(`info protocol: unexpected ${JSON.stringify(frame.header.type).slice(0, 40)} frame from ${channel.remotePeer}`)
    await channel.send({ type: 'info', profile: profile() })
  }
  await channel.close()
}

/** Registers the info protocol on `node`. */
export async function serveInfo(node: TransportNode, profile: () => DeviceProfile): Promise<void> {
  await node.handle(INFO_PROTOCOL, (channel) => answerInfo(channel, profile))
}

/**
 * Dials `address` on the info protocol, sends `rounds` info requests one after another and returns the profile with
 * the median round trip of all but the first. `fresh` opens a new connection even when one to that peer id is open
 * (so the agent at this very address answers, not another process holding the same key).
 * @throws MembershipError when the agent is not in the trust set; DialError when the agent is unreachable or does not speak the protocol; RangeError when it answers with
 *   something that is not a profile; PeerGoneError when it closes the stream early.
 */
export async function probeAgent(
  node: TransportNode,
  address: string,
  options: { signal?: AbortSignal; rounds?: number; fresh?: boolean } = {},
): Promise<AgentProbe> {
  const rounds = Math.max(2, options.rounds ?? 4)
  const signalOption = options.signal ? { signal: options.signal } : {}
  const channel = await node.dial(address, INFO_PROTOCOL, { ...signalOption, ...(options.fresh ? { fresh: true } : {}) })
  try {
    const rttsMs: number[] = []
    let profile: DeviceProfile | undefined
    for (let i = 0; i < rounds; i++) {
      const startMs = performance.now()
      await channel.send({ type: 'info' }, null, signalOption)
      const frame = await channel.read(signalOption)
      if (frame === null) throw new RangeError(`agent at ${address} closed the info stream`)
      rttsMs.push(performance.now() - startMs)
      profile = parseProfile(frame.header.profile, address)
    }
    const sorted = rttsMs.slice(1).sort((a, b) => a - b)
    return { peer: channel.remotePeer, address, profile: profile!, rttMs: sorted[Math.floor(sorted.length / 2)]! }
  } finally {
    await channel.close().catch(() => {})
  }
}

/** Checks an untrusted profile field by field. @throws RangeError naming the agent and the field. */
export function parseProfile(value: unknown, source: string): DeviceProfile {
  if (typeof value !== 'object' || value === null) throw new RangeError(`agent at ${source} sent no device profile`)
  const v = value as Record<string, unknown>
  const text = (key: string): string => {
    if (typeof v[key] !== 'string') throw new RangeError(`agent at ${source}: profile field ${key} is not a string`)
    return (v[key] as string).slice(0, 256)
  }
  const number = (key: string): number => {
    if (typeof v[key] !== 'number' || !Number.isFinite(v[key])) throw new RangeError(`agent at ${source}: profile field ${key} is not a number`)
    return v[key] as number
  }
  return {
    hostname: text('hostname'),
    platform: text('platform'),
    cores: number('cores'),
    totalMemoryBytes: number('totalMemoryBytes'),
    freeMemoryBytes: number('freeMemoryBytes'),
    loadAverage: number('loadAverage'),
    nodeVersion: text('nodeVersion'),
    ortVersion: text('ortVersion'),
    busy: v.busy === true,
    ...(typeof v.instance === 'string' ? { instance: v.instance.slice(0, 64) } : {}),
    ...(v.measured === undefined
      ? {}
      : {
          measured: parseCapabilities(v.measured, (field, detail) => {
            throw new RangeError(`agent at ${source}: profile field measured${field === '' ? '' : `.${field}`}: ${detail}`)
          }),
        }),
  }
}
