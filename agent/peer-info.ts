/**
 * The info protocol (`/edgeshard/info/1.0.0`, see transport/protocols.ts): every agent answers `{ type: 'info' }`
 * frames with its device profile, so a master or `edgeshard peers` can list agents and time round trips to them.
 */
import { arch, cpus, freemem, hostname, loadavg, platform, totalmem } from 'node:os'
import { type FramedChannel, INFO_PROTOCOL, type TransportNode } from '../transport/index.ts'
import { runtimeVersion } from './runtime.ts'

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
  }
}

/** Answers every `info` frame on `channel` with `profile()` until the dialler closes the stream. */
export async function answerInfo(channel: FramedChannel, profile: () => DeviceProfile): Promise<void> {
  for await (const frame of channel) {
    if (frame.header.type !== 'info') throw new RangeError(`info protocol: unexpected ${String(frame.header.type)} frame`)
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
 * the median round trip of all but the first.
 * @throws DialError when the agent is unreachable or does not speak the protocol; RangeError when it answers with
 *   something that is not a profile; PeerGoneError when it closes the stream early.
 */
export async function probeAgent(
  node: TransportNode,
  address: string,
  options: { signal?: AbortSignal; rounds?: number } = {},
): Promise<AgentProbe> {
  const rounds = Math.max(2, options.rounds ?? 4)
  const signalOption = options.signal ? { signal: options.signal } : {}
  const channel = await node.dial(address, INFO_PROTOCOL, signalOption)
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
  }
}
