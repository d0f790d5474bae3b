/**
 * Measures the link to another agent over the real libp2p stream (noise, yamux, and any link shaper on the way): the
 * round trip of small messages and the throughput of large ones. Uses the info protocol every agent already serves
 * (agent/peer-info.ts): an `info` frame may carry a body, which the agent ignores while answering with its (small)
 * profile, so a frame of B bytes answered after T ms moved B bytes one way in T − rtt.
 */
import { type FramedChannel, INFO_PROTOCOL, type TransportNode } from '../transport/index.ts'

/** A measured link from this node to one agent. */
export interface LinkMeasurement {
  /** Peer id of the agent. */
  readonly peer: string
  readonly address: string
  /** Median round trip of a header-only info request on an open stream, ms. */
  readonly rttMs: number
  /** Every timed round trip, ms (the stream-opening one excluded). */
  readonly rttSamplesMs: readonly number[]
  /** Median throughput from here to the agent, Mbit/s (1e6 bits/s). */
  readonly mbps: number
  /** Bytes of each throughput probe. */
  readonly payloadBytes: number
  /** Every timed one-way transfer of `payloadBytes` (round trip minus the median rtt), ms. */
  readonly transferSamplesMs: readonly number[]
}

/** Options of {@link probeLink}. */
export interface LinkProbeOptions {
  readonly signal?: AbortSignal
  /** Timed small round trips (median kept). Default 20. */
  readonly rounds?: number
  /** Bytes per throughput probe. Default 2 MiB. */
  readonly payloadBytes?: number
  /** Timed throughput probes (median kept), after one untimed probe that lets TCP and yamux windows grow. Default 3. */
  readonly payloadRounds?: number
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)]!
}

async function roundTrip(channel: FramedChannel, body: Uint8Array | null, address: string, signal: { signal?: AbortSignal }): Promise<number> {
  const startMs = performance.now()
  await channel.send({ type: 'info' }, body, signal)
  const frame = await channel.read(signal)
  if (frame === null) throw new RangeError(`agent at ${address} closed the info stream`)
  if (frame.header.type !== 'info') throw new RangeError(`agent at ${address} answered an info request with a ${String(frame.header.type).slice(0, 40)} frame`)
  return performance.now() - startMs
}

/**
 * Measures round trip and throughput to the agent at `address` (a multiaddr with `/p2p/<peer id>`) on one info stream.
 * @throws DialError when the agent is unreachable or does not speak the info protocol; RangeError when it answers
 *   with something else or closes the stream; PeerGoneError when it goes away; the signal's reason when aborted
 * @example
 * const link = await probeLink(node, '/ip4/10.0.0.2/tcp/7000/p2p/12D3…', { signal: AbortSignal.timeout(10_000) })
 * // link.rttMs ≈ 0.6, link.mbps ≈ 900 on gigabit Ethernet
 */
export async function probeLink(node: TransportNode, address: string, options: LinkProbeOptions = {}): Promise<LinkMeasurement> {
  const rounds = Math.max(1, options.rounds ?? 20)
  const payloadBytes = Math.max(1, Math.floor(options.payloadBytes ?? 2 * 2 ** 20))
  const payloadRounds = Math.max(1, options.payloadRounds ?? 3)
  const signal = options.signal ? { signal: options.signal } : {}
  const channel = await node.dial(address, INFO_PROTOCOL, signal)
  try {
    await roundTrip(channel, null, address, signal) // opens the stream: not timed
    const rttSamplesMs: number[] = []
    for (let i = 0; i < rounds; i++) rttSamplesMs.push(await roundTrip(channel, null, address, signal))
    const rttMs = median(rttSamplesMs)
    const payload = new Uint8Array(payloadBytes)
    for (let i = 0; i < payload.length; i += 4096) payload[i] = i & 0xff
    await roundTrip(channel, payload, address, signal) // grows the windows: not timed
    const transferSamplesMs: number[] = []
    for (let i = 0; i < payloadRounds; i++) {
      // At least a microsecond: on loopback a fast transfer can come within timer noise of the rtt.
      transferSamplesMs.push(Math.max(1e-3, (await roundTrip(channel, payload, address, signal)) - rttMs))
    }
    const mbps = (payloadBytes * 8) / (median(transferSamplesMs) * 1e3)
    return { peer: channel.remotePeer, address, rttMs, rttSamplesMs, mbps, payloadBytes, transferSamplesMs }
  } finally {
    await channel.close().catch(() => {})
  }
}
