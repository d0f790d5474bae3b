/**
 * The cluster survey, run before a plan is made: every link of the cluster measured over the real libp2p streams —
 * the master's link to each worker, and each pair of workers (the lower-numbered worker probes the other from its own
 * node) — and, when asked, every device's measured profile as its agent publishes it in the info protocol. With
 * emulated links (`edgeshard emulate`), each agent shapes its sends to the others for the survey's duration, as it
 * will once the plan is loaded, so the figures are those of the emulated links.
 *
 * Protocol `/edgeshard/survey/1.0.0` (transport/protocols.ts): the dialler sends one request at a time and the agent
 * answers each:
 * - `{ type: 'survey-shape', links: [{ peer, rttMs, bitsPerSecond }] }` → `{ type: 'survey-shaped' }`: emulate those
 *   links (sends to each peer shaped, its arrivals held) until the stream ends; a link the agent already emulates for
 *   a running session is kept.
 * - `{ type: 'survey-probe', targets: [{ address, rounds, payloadBytes, payloadRounds }] }` →
 *   `{ type: 'survey-links', links: [{ address, peer, rttMs, mbps, payloadBytes, rttSamplesMs, transferSamplesMs }
 *   | { address, error }] }`: the agent measures its link to each target in turn (agent/link-probe.ts).
 * - `{ type: 'survey-measure' }` → `{ type: 'survey-measured', cached, ms }`: the agent loads its cached measurement
 *   for its present CPU quota, or measures its device now, and publishes it in its info answers.
 * A request that fails is answered `{ type: 'error', message }`; the stream stays open.
 */
import { logger } from '@libp2p/logger'
import type { DeviceCapabilities } from '../devices/index.ts'
import {
  type FramedChannel,
  type LinkEmulation,
  LinkShaper,
  SURVEY_PROTOCOL,
  TransportNode,
  type TransportNodeOptions,
} from '../transport/index.ts'
import { PeerFailedError } from './errors.ts'
import { type LinkMeasurement, type LinkProbeOptions, probeLink } from './link-probe.ts'
import { probeAgent } from './peer-info.ts'
import { ProtocolError } from './protocol.ts'

const log = logger('edgeshard:agent:survey')

/** Most links one `survey-shape` may carry. */
const MAX_ENTRIES = 256
/**
 * Most targets one `survey-probe` may name, and bounds of its probe options: one request costs the agent at most
 * MAX_TARGETS × (MAX_PAYLOAD_ROUNDS + 1) × MAX_PAYLOAD_BYTES of traffic.
 */
const MAX_TARGETS = 16
const MAX_ROUNDS = 200
const MAX_PAYLOAD_ROUNDS = 20
const MAX_PAYLOAD_BYTES = 16 * 2 ** 20
/** How long an agent gives one target's probe, and the master one request, ms. */
const PROBE_TIMEOUT_MS = 60_000
const REQUEST_TIMEOUT_MS = 180_000

/** What an agent needs to answer the survey protocol. */
export interface SurveyAgentOptions {
  /** The agent's emulated links by remote peer id (the map its node's link shaper reads): `survey-shape` adds to it. */
  readonly shapers: Map<string, LinkShaper>
  /**
   * Loads this device's cached measurement for its present CPU quota or measures it now, and publishes it in the info
   * protocol. Absent: `survey-measure` is refused.
   */
  readonly measure?: () => Promise<{ readonly cached: boolean }>
}

/** Registers the survey protocol on `node` (an agent's). */
export async function serveSurvey(node: TransportNode, options: SurveyAgentOptions): Promise<void> {
  await node.handle(SURVEY_PROTOCOL, (channel) => answerSurvey(channel, node, options))
}

/** Answers survey requests on `channel` until the dialler closes it, then removes the links it emulated. */
export async function answerSurvey(channel: FramedChannel, node: TransportNode, options: SurveyAgentOptions): Promise<void> {
  const installed = new Map<string, LinkShaper>()
  try {
    for await (const frame of channel) {
      const header = frame.header as Record<string, unknown>
      try {
        await channel.send(await answer(header, node, options, installed))
      } catch (err) {
        log('survey request %s from %s failed: %s', String(header.type).slice(0, 40), channel.remotePeer, (err as Error).message)
        await channel.send({ type: 'error', message: (err as Error).message.slice(0, 1000) })
      }
    }
  } finally {
    for (const [peer, shaper] of installed) if (options.shapers.get(peer) === shaper) options.shapers.delete(peer)
    await channel.close().catch(() => {})
  }
}

async function answer(
  header: Record<string, unknown>,
  node: TransportNode,
  options: SurveyAgentOptions,
  installed: Map<string, LinkShaper>,
): Promise<{ type: string } & Record<string, unknown>> {
  switch (header.type) {
    case 'survey-shape': {
      for (const link of parseShapeLinks(header.links)) {
        if (options.shapers.has(link.peer) && !installed.has(link.peer)) continue
        const shaper = new LinkShaper({ rttMs: link.rttMs, bitsPerSecond: link.bitsPerSecond })
        options.shapers.set(link.peer, shaper)
        installed.set(link.peer, shaper)
      }
      return { type: 'survey-shaped' }
    }
    case 'survey-probe': {
      const links: Record<string, unknown>[] = []
      for (const target of parseTargets(header.targets)) {
        const { address, ...probe } = target
        try {
          const m = await probeLink(node, address, { ...probe, signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) })
          links.push({ ...m })
        } catch (err) {
          links.push({ address, error: (err as Error).message.slice(0, 500) })
        }
      }
      return { type: 'survey-links', links }
    }
    case 'survey-measure': {
      if (!options.measure) throw new ProtocolError('survey: this agent cannot measure its device')
      const startMs = performance.now()
      const { cached } = await options.measure()
      return { type: 'survey-measured', cached, ms: performance.now() - startMs }
    }
    default:
      throw new ProtocolError(`survey protocol: unexpected ${JSON.stringify(header.type)?.slice(0, 40)} frame`)
  }
}

/** @throws ProtocolError naming the entry and the field */
function parseShapeLinks(value: unknown): { peer: string; rttMs: number; bitsPerSecond: number }[] {
  if (!Array.isArray(value) || value.length > MAX_ENTRIES) throw new ProtocolError(`survey-shape: links must be an array of at most ${MAX_ENTRIES}`)
  return value.map((entry: unknown, i) => {
    const v = (entry ?? {}) as Record<string, unknown>
    if (typeof v.peer !== 'string' || v.peer.length === 0 || v.peer.length > 128) throw new ProtocolError(`survey-shape: link ${i} has no peer id`)
    if (typeof v.rttMs !== 'number' || !(v.rttMs >= 0 && v.rttMs <= 60_000)) throw new ProtocolError(`survey-shape: link ${i} rttMs must be 0..60000`)
    if (typeof v.bitsPerSecond !== 'number' || !(v.bitsPerSecond > 0 && Number.isFinite(v.bitsPerSecond))) {
      throw new ProtocolError(`survey-shape: link ${i} bitsPerSecond must be a positive number`)
    }
    return { peer: v.peer, rttMs: v.rttMs, bitsPerSecond: v.bitsPerSecond }
  })
}

/** @throws ProtocolError naming the entry and the field */
function parseTargets(value: unknown): ({ address: string } & Required<Omit<LinkProbeOptions, 'signal'>>)[] {
  if (!Array.isArray(value) || value.length > MAX_TARGETS) throw new ProtocolError(`survey-probe: targets must be an array of at most ${MAX_TARGETS}`)
  return value.map((entry: unknown, i) => {
    const v = (entry ?? {}) as Record<string, unknown>
    if (typeof v.address !== 'string' || v.address.length === 0 || v.address.length > 1024) throw new ProtocolError(`survey-probe: target ${i} has no address`)
    const whole = (key: string, max: number): number => {
      const n = v[key]
      if (!Number.isInteger(n) || (n as number) < 1 || (n as number) > max) throw new ProtocolError(`survey-probe: target ${i} ${key} must be a whole number 1..${max}`)
      return n as number
    }
    return { address: v.address, rounds: whole('rounds', MAX_ROUNDS), payloadBytes: whole('payloadBytes', MAX_PAYLOAD_BYTES), payloadRounds: whole('payloadRounds', MAX_PAYLOAD_ROUNDS) }
  })
}

/** One measured link of a survey: devices `from` < `to` (0 = master), measured from `from`. */
export interface SurveyedLink {
  readonly from: number
  readonly to: number
  readonly link: LinkMeasurement
}

/** What a survey found. Plain data. */
export interface ClusterSurvey {
  /** Every pair of devices once (from < to), in the order measured; empty when links were not probed. */
  readonly links: readonly SurveyedLink[]
  /** Each device's published measurement (index 0 = the master's own); empty when profiles were not asked for. */
  readonly profiles: readonly DeviceCapabilities[]
}

/** The link between devices `a` and `b` a survey measured (links are taken as symmetric), or undefined. */
export function surveyedLink(survey: ClusterSurvey, a: number, b: number): LinkMeasurement | undefined {
  const [from, to] = a < b ? [a, b] : [b, a]
  return survey.links.find((l) => l.from === from && l.to === to)?.link
}

/** Probe options of one link (the signal is the survey's). */
export type SurveyProbeOptions = Required<Omit<LinkProbeOptions, 'signal'>>

/** Options of {@link surveyCluster}. */
export interface ClusterSurveyOptions {
  readonly signal?: AbortSignal
  /** The master's libp2p identity and the workers it admits, as the cluster's (so the workers admit the survey). */
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
  /** Emulated links between devices (0 = master, i = `workers[i-1]`): both ends shape their sends during the survey. */
  readonly emulated?: (from: number, to: number) => LinkEmulation | undefined
  /** Measure every link. Default true. */
  readonly probe?: boolean
  /** Probe options of the link between devices `from` < `to`. Default: 10 round trips, 3 timed transfers of 1 MiB. */
  readonly probeOptions?: (from: number, to: number) => SurveyProbeOptions
  /**
   * Ask every device for its measured profile: `self()` gives the master's own; each agent is asked to measure (or load
   * its cached measurement) and publish it, then its info answer is read. Devices are measured one at a time.
   */
  readonly profiles?: { readonly self: () => Promise<DeviceCapabilities> }
  /** Called as each device's profile is known. */
  readonly onProfile?: (device: number, capabilities: DeviceCapabilities, cached: boolean) => void
  /** Called as each link is measured. */
  readonly onLink?: (link: SurveyedLink) => void
}

const DEFAULT_PROBE: SurveyProbeOptions = { rounds: 10, payloadBytes: 2 ** 20, payloadRounds: 3 }

/**
 * Surveys the master plus `workers` (multiaddrs with `/p2p/<peer id>`, devices 1..N): profiles first (one device at a
 * time, so measurements do not disturb each other), then every link, one at a time. A node of its own, stopped before
 * it returns; the agents stop emulating the survey's links when it ends.
 * @throws DialError when an agent is unreachable or does not speak the survey protocol; PeerFailedError naming the
 *   worker when one refuses a request, cannot reach another, or has published no measurement; the signal's reason
 */
export async function surveyCluster(workers: readonly string[], options: ClusterSurveyOptions = {}): Promise<ClusterSurvey> {
  const shapers = new Map<string, LinkShaper>()
  const node = new TransportNode({ listen: [], linkShaper: (peer) => shapers.get(peer), ...options.transport })
  const signal = options.signal
  const signalOption = signal ? { signal } : {}
  const channels: FramedChannel[] = []
  await node.start()
  try {
    for (const address of workers) channels.push(await node.dial(address, SURVEY_PROTOCOL, { ...signalOption, fresh: true }))
    const name = (device: number): string => (device === 0 ? 'the master' : `worker ${device} (${workers[device - 1]})`)
    const request = async (device: number, header: { type: string } & Record<string, unknown>, expected: string): Promise<Record<string, unknown>> => {
      const channel = channels[device - 1]!
      const requestSignal = signal ? AbortSignal.any([signal, AbortSignal.timeout(REQUEST_TIMEOUT_MS)]) : AbortSignal.timeout(REQUEST_TIMEOUT_MS)
      await channel.send(header, null, { signal: requestSignal })
      const frame = await channel.read({ signal: requestSignal })
      if (frame === null) throw new PeerFailedError(channel.remotePeer, `${name(device)} closed the survey stream`)
      const reply = frame.header as Record<string, unknown>
      if (reply.type === 'error') throw new PeerFailedError(channel.remotePeer, `${name(device)} refused ${header.type}: ${String(reply.message).slice(0, 500)}`)
      if (reply.type !== expected) throw new PeerFailedError(channel.remotePeer, `${name(device)} answered ${header.type} with ${JSON.stringify(reply.type)?.slice(0, 40)}`)
      return reply
    }

    const profiles: DeviceCapabilities[] = []
    if (options.profiles) {
      const own = await options.profiles.self()
      profiles.push(own)
      options.onProfile?.(0, own, false)
      for (const [k, address] of workers.entries()) {
        const reply = await request(k + 1, { type: 'survey-measure' }, 'survey-measured')
        const probe = await probeAgent(node, address, { ...signalOption, rounds: 2 })
        if (!probe.profile.measured) throw new PeerFailedError(probe.peer, `${name(k + 1)} has published no device measurement`)
        profiles.push(probe.profile.measured)
        options.onProfile?.(k + 1, probe.profile.measured, reply.cached === true)
      }
    }

    const links: SurveyedLink[] = []
    if (options.probe ?? true) {
      const peers = [node.peerId, ...channels.map((c) => c.remotePeer)]
      if (options.emulated) {
        for (const k of workers.keys()) {
          const from = k + 1
          const emulated = peers.flatMap((peer, to) => {
            const link = to === from ? undefined : options.emulated!(from, to)
            return link ? [{ peer, rttMs: link.rttMs, bitsPerSecond: link.bitsPerSecond }] : []
          })
          await request(from, { type: 'survey-shape', links: emulated }, 'survey-shaped')
        }
        for (const [k, channel] of channels.entries()) {
          const link = options.emulated(0, k + 1)
          if (link) shapers.set(channel.remotePeer, new LinkShaper(link))
        }
      }
      const probeOptions = options.probeOptions ?? (() => DEFAULT_PROBE)
      const found = (link: SurveyedLink): void => {
        links.push(link)
        options.onLink?.(link)
      }
      for (const [k, address] of workers.entries()) {
        found({ from: 0, to: k + 1, link: await probeLink(node, address, { ...probeOptions(0, k + 1), ...signalOption }) })
      }
      for (let from = 1; from < workers.length; from++) {
        for (let to = from + 1; to <= workers.length; to++) {
          const target = { address: workers[to - 1]!, ...probeOptions(from, to) }
          const reply = await request(from, { type: 'survey-probe', targets: [target] }, 'survey-links')
          found({ from, to, link: parseReportedLink(reply.links, target, `${name(from)} measuring its link to ${name(to)}`, channels[from - 1]!.remotePeer) })
        }
      }
    }
    return { links, profiles }
  } finally {
    await Promise.all(channels.map((c) => c.close().catch(() => {})))
    await node.stop()
  }
}

/** The one link a worker reported for `target`. @throws PeerFailedError naming `what` when it failed or is malformed */
function parseReportedLink(value: unknown, target: { address: string; payloadBytes: number }, what: string, peer: string): LinkMeasurement {
  const entry = (Array.isArray(value) && value.length === 1 ? value[0] : undefined) as Record<string, unknown> | undefined
  if (entry && typeof entry.error === 'string') throw new PeerFailedError(peer, `${what}: ${entry.error.slice(0, 500)}`)
  const positive = (key: string): number => {
    const n = entry?.[key]
    if (typeof n !== 'number' || !(n > 0) || !Number.isFinite(n)) throw new PeerFailedError(peer, `${what}: the report's ${key} is not a positive number`)
    return n
  }
  const samples = (key: string): number[] => {
    const list = entry?.[key]
    if (!Array.isArray(list) || list.length > MAX_ROUNDS || list.some((x) => typeof x !== 'number' || !Number.isFinite(x))) {
      throw new PeerFailedError(peer, `${what}: the report's ${key} is not a list of numbers`)
    }
    return list as number[]
  }
  return {
    peer: typeof entry?.peer === 'string' ? entry.peer.slice(0, 128) : '',
    address: target.address,
    rttMs: positive('rttMs'),
    rttSamplesMs: samples('rttSamplesMs'),
    mbps: positive('mbps'),
    payloadBytes: positive('payloadBytes'),
    transferSamplesMs: samples('transferSamplesMs'),
  }
}
