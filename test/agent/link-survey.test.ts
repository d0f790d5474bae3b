/**
 * The cluster survey over real libp2p nodes on 127.0.0.1: the master measures its links to two agents and has the
 * agents measure the link between them, each end shaping its sends as the emulator does; profiles are read back from
 * the agents' info answers. Then the pure step from a survey to the planner's cluster spec.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type ClusterSurvey, serveSurvey, surveyCluster, surveyedLink } from '../../agent/link-survey.ts'
import { deviceProfile, publishMeasuredCapabilities, serveInfo } from '../../agent/peer-info.ts'
import { surveyedClusterSpec, withSurvey } from '../../agent/surveyed-cluster.ts'
import { clusterLink, parseClusterFile } from '../../devices/index.ts'
import { type LinkEmulation, type LinkShaper, TransportNode } from '../../transport/index.ts'

/** Emulated links between device 0 (the master) and agents 1 and 2. */
const LINKS: Record<string, LinkEmulation> = {
  '0-1': { rttMs: 20, bitsPerSecond: 40e6 },
  '0-2': { rttMs: 30, bitsPerSecond: 80e6 },
  '1-2': { rttMs: 15, bitsPerSecond: 60e6 },
}
const emulated = (a: number, b: number): LinkEmulation | undefined => LINKS[a < b ? `${a}-${b}` : `${b}-${a}`]

describe('surveyCluster over real libp2p nodes on 127.0.0.1', () => {
  const shapers = [new Map<string, LinkShaper>(), new Map<string, LinkShaper>()]
  const agents = shapers.map((map) => new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'], linkShaper: (peer) => map.get(peer) }))
  const measured = { memoryBytes: 1e9, cores: 0.5, decodeGBs: 3.5, decodeNBitsGBs: 2.5, prefillGflops: 20, diskReadMBs: 300 }
  let measureCalls = 0

  beforeAll(async () => {
    for (const [i, agent] of agents.entries()) {
      await agent.start()
      await serveInfo(agent, () => deviceProfile(false))
      await serveSurvey(agent, {
        shapers: shapers[i]!,
        // The first agent measures (and publishes); the second cannot.
        ...(i === 0
          ? {
              measure: async () => {
                measureCalls++
                publishMeasuredCapabilities(measured)
                return { cached: true }
              },
            }
          : {}),
      })
    }
  })
  afterAll(async () => {
    publishMeasuredCapabilities(undefined)
    await Promise.all(agents.map((a) => a.stop()))
  })

  it('measures master ↔ worker and worker ↔ worker links within 20 % of the emulated rtt and rate, then stops emulating', async () => {
    const seen: string[] = []
    const survey = await surveyCluster(
      agents.map((a) => a.multiaddrs()[0]!),
      {
        emulated,
        probeOptions: (from, to) => ({ rounds: 20, payloadRounds: 3, payloadBytes: Math.round(emulated(from, to)!.bitsPerSecond / 8 / 5) }),
        onLink: (l) => seen.push(`${l.from}-${l.to}`),
        signal: AbortSignal.timeout(60_000),
      },
    )
    expect(seen).toEqual(['0-1', '0-2', '1-2'])
    expect(survey.profiles).toEqual([])
    for (const [key, set] of Object.entries(LINKS)) {
      const [a, b] = key.split('-').map(Number) as [number, number]
      const link = surveyedLink(survey, b, a)!
      expect(Math.abs(link.rttMs - set.rttMs) / set.rttMs, `rtt ${key}: ${link.rttMs} ms`).toBeLessThan(0.2)
      expect(Math.abs(link.mbps - set.bitsPerSecond / 1e6) / (set.bitsPerSecond / 1e6), `rate ${key}: ${link.mbps} Mbit/s`).toBeLessThan(0.2)
    }
    // The worker–worker link was measured by agent 1 from its own node: the far end is agent 2.
    expect(surveyedLink(survey, 1, 2)!.peer).toBe(agents[1]!.peerId)
    // The survey's emulation ends with its streams.
    const deadline = Date.now() + 5_000
    while (shapers.some((m) => m.size > 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    expect(shapers.map((m) => m.size)).toEqual([0, 0])
  }, 60_000)

  it('reads the profile an agent publishes once asked to measure, and names a worker that cannot measure', async () => {
    const own = { ...measured, decodeGBs: 9 }
    const onlyFirst = await surveyCluster([agents[0]!.multiaddrs()[0]!], { probe: false, profiles: { self: async () => own } })
    expect(measureCalls).toBe(1)
    expect(onlyFirst.links).toEqual([])
    expect(onlyFirst.profiles[0]).toEqual(own)
    const { memoryBytes, ...rest } = onlyFirst.profiles[1]!
    expect(rest).toEqual({ cores: 0.5, decodeGBs: 3.5, decodeNBitsGBs: 2.5, prefillGflops: 20, diskReadMBs: 300 })
    expect(memoryBytes).toBeGreaterThan(0)
    const second = agents[1]!.multiaddrs()[0]!
    const refused = await surveyCluster([agents[0]!.multiaddrs()[0]!, second], { probe: false, profiles: { self: async () => own } }).catch((e: Error) => e)
    expect((refused as Error).name).toBe('PeerFailedError')
    expect((refused as Error).message).toBe(`worker 2 (${second}) refused survey-measure: survey: this agent cannot measure its device`)
  }, 30_000)
})

describe('cluster specs from a survey', () => {
  const spec = parseClusterFile(
    JSON.stringify({
      devices: [
        { name: 'm', profile: 'laptop', memoryBudget: '1GiB' },
        { name: 'a', profile: { memoryBytes: 4e9, cores: 4, decodeGBs: 4, prefillGflops: 20, diskReadMBs: 80, blockOverheadMs: 0.2 } },
        { name: 'b', profile: 'raspberry-pi-4b' },
      ],
      links: { default: { rttMs: 1, mbps: 1000 } },
    }),
    'c.json',
  )
  const link = (rttMs: number, mbps: number) => ({ peer: 'p', address: 'x', rttMs, rttSamplesMs: [rttMs], mbps, payloadBytes: 1, transferSamplesMs: [1] })
  const profile = (decodeGBs: number) => ({ memoryBytes: 8e9, cores: 1, decodeGBs, prefillGflops: 10, diskReadMBs: 100 })
  const survey: ClusterSurvey = {
    links: [
      { from: 0, to: 1, link: link(21, 39) },
      { from: 0, to: 2, link: link(31, 78) },
      { from: 1, to: 2, link: link(14.5, 61) },
    ],
    profiles: [profile(7), profile(3), profile(1.5)],
  }

  it('takes over measured links and profiles; budgets and calibrated overheads stay the file’s', () => {
    const both = withSurvey(spec, survey, { links: true, profiles: true })
    expect(clusterLink(both, 'a', 'b')).toEqual({ rttMs: 14.5, mbps: 61 })
    expect(clusterLink(both, 2, 0)).toEqual({ rttMs: 31, mbps: 78 })
    expect(both.devices.map((d) => d.capabilities.decodeGBs)).toEqual([7, 3, 1.5])
    expect(both.devices.map((d) => d.memoryBudgetBytes)).toEqual(spec.devices.map((d) => d.memoryBudgetBytes))
    expect(both.devices[1]!.capabilities.blockOverheadMs).toBe(0.2)
    expect(both.devices[0]!.profile).toBe('measured')
    const linksOnly = withSurvey(spec, survey, { links: true, profiles: false })
    expect(linksOnly.devices).toBe(spec.devices)
    expect(clusterLink(linksOnly, 'm', 'a')).toEqual({ rttMs: 21, mbps: 39 })
    expect(() => withSurvey(spec, { links: [], profiles: [] }, { links: true, profiles: false })).toThrow('the survey did not measure the link m ↔ a')
  })

  it('builds a spec from measurements alone, budgets from the flag or 75 % of the measured memory', () => {
    const s = surveyedClusterSpec('the measured cluster', ['master', 'worker-1', 'worker-2'], [5e8, undefined, undefined], survey)
    expect(s.devices.map((d) => d.memoryBudgetBytes)).toEqual([5e8, 6e9, 6e9])
    expect(clusterLink(s, 'worker-1', 'worker-2')).toEqual({ rttMs: 14.5, mbps: 61 })
    expect(() => surveyedClusterSpec('x', ['master', 'w'], [], { links: [], profiles: [profile(1)] })).toThrow('the survey has no measured profile of device 1 (w)')
  })
})
