import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { probeLink } from '../../agent/link-probe.ts'
import { deviceProfile, parseProfile, probeAgent, publishMeasuredCapabilities, serveInfo } from '../../agent/peer-info.ts'
import { TransportNode } from '../../transport/index.ts'

describe('probeLink over real libp2p nodes on 127.0.0.1', () => {
  const agent = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
  const prober = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })

  beforeAll(async () => {
    await Promise.all([agent.start(), prober.start()])
    await serveInfo(agent, () => deviceProfile(false))
  })
  afterAll(async () => {
    publishMeasuredCapabilities(undefined)
    await Promise.all([agent.stop(), prober.stop()])
  })

  it('measures round trip and throughput on the info stream', async () => {
    const link = await probeLink(prober, agent.multiaddrs()[0]!, { rounds: 10, payloadBytes: 1 << 20, payloadRounds: 3, signal: AbortSignal.timeout(20_000) })
    expect(link.peer).toBe(agent.peerId)
    expect(link.rttSamplesMs).toHaveLength(10)
    expect(link.transferSamplesMs).toHaveLength(3)
    const sorted = [...link.rttSamplesMs].sort((a, b) => a - b)
    expect(link.rttMs).toBe(sorted[5])
    // Loopback through noise + yamux: well under 50 ms a round trip, well over 10 Mbit/s (NOTES: ~0.6 ms, ~180 MB/s).
    expect(link.rttMs).toBeGreaterThan(0)
    expect(link.rttMs).toBeLessThan(50)
    expect(link.mbps).toBeGreaterThan(10)
    expect(link.payloadBytes).toBe(1 << 20)
    // mbps is the payload over the median transfer time.
    const t = [...link.transferSamplesMs].sort((a, b) => a - b)[1]!
    expect(link.mbps).toBeCloseTo(((1 << 20) * 8) / (t * 1e3), 6)
  })

  it('carries the published measurement in the agent profile, and parses it back', async () => {
    const measured = { memoryBytes: 1e9, cores: 2, decodeGBs: 12.5, decodeNBitsGBs: 7, prefillGflops: 90, diskReadMBs: 800 }
    publishMeasuredCapabilities(measured)
    const probe = await probeAgent(prober, agent.multiaddrs()[0]!, { signal: AbortSignal.timeout(10_000) })
    expect(probe.profile.measured).toBeDefined()
    const { memoryBytes, ...rest } = probe.profile.measured!
    expect(rest).toEqual({ cores: 2, decodeGBs: 12.5, decodeNBitsGBs: 7, prefillGflops: 90, diskReadMBs: 800 })
    // Memory is what is available now, not the cached figure.
    expect(memoryBytes).toBeGreaterThan(0)
    const bad = { ...probe.profile, measured: { ...measured, decodeGBs: -1 } }
    expect(() => parseProfile(bad, 'x')).toThrow('agent at x: profile field measured.decodeGBs: expected a number > 0, got -1')
  })
})
