/**
 * The rejoiner's choices between requests, against a stand-in cluster: which addresses it dials, the back-off
 * of those that do not answer, and which discovered agents it takes (idle ones not in the cluster).
 */
import { describe, expect, it } from 'vitest'
import type { AdmitReport } from '../../agent/cluster.ts'
import type { AgentProbe, DeviceProfile } from '../../agent/peer-info.ts'
import { type AgentSource, type RejoinTarget, Rejoiner } from '../../agent/rejoin.ts'

/** A cluster whose workers are `live`; `admit` takes the addresses in `up` and reports the others unreachable. */
class FakeCluster implements RejoinTarget {
  live: { device: number; address: string; peer: string }[]
  up = new Set<string>()
  calls: string[][] = []

  constructor(live: { device: number; address: string; peer: string }[]) {
    this.live = live
  }

  get workers(): { device: number; address: string; peer: string }[] {
    return this.live
  }

  async admit(addresses: readonly string[]): Promise<AdmitReport> {
    this.calls.push([...addresses])
    const admitted = addresses.filter((a) => this.up.has(a)).map((address, i) => ({ device: 10 + i, address, peer: `peer-${address}` }))
    this.live.push(...admitted)
    return {
      admitted,
      unreachable: addresses.filter((a) => !this.up.has(a)).map((address) => ({ address, reason: 'connection refused' })),
      dropped: [],
      peers: this.live.length + 1,
      ...(admitted.length > 0 ? { plan: { by: 'even' as const, why: 'test' } } : {}),
      totalMs: 1,
    }
  }
}

const profile = (busy: boolean): DeviceProfile => ({
  hostname: 'h',
  platform: 'linux-x64',
  cores: 2,
  totalMemoryBytes: 1,
  freeMemoryBytes: 1,
  loadAverage: 0,
  nodeVersion: '24',
  ortVersion: '1.30.0',
  busy,
})

describe('Rejoiner', () => {
  it('dials nothing while every worker is there, then the missing one, backing off while it does not answer', async () => {
    let nowMs = 0
    const cluster = new FakeCluster([
      { device: 1, address: 'A', peer: 'pa' },
      { device: 2, address: 'B', peer: 'pb' },
    ])
    const rejoiner = new Rejoiner(cluster, { addresses: ['A', 'B'], retryMs: 1000, maxRetryMs: 4000, now: () => nowMs })
    expect(await rejoiner.beforeRequest()).toBeNull()
    expect(cluster.calls).toEqual([])

    cluster.live = cluster.live.filter((w) => w.address !== 'B') // B lost
    expect((await rejoiner.beforeRequest())!.unreachable.map((u) => u.address)).toEqual(['B'])
    // Backing off: 1 s, then 2 s, then 4 s (the cap), then 4 s.
    const dialledAt: number[] = []
    for (nowMs = 1; nowMs <= 12_000; nowMs += 250) {
      if (await rejoiner.beforeRequest()) dialledAt.push(nowMs)
    }
    expect(dialledAt).toEqual([1001, 3001, 7001, 11_001])

    cluster.up.add('B') // back
    nowMs = 15_001
    const report = await rejoiner.beforeRequest()
    expect(report!.admitted.map((w) => w.address)).toEqual(['B'])
    expect(cluster.calls.at(-1)).toEqual(['B'])
    expect(await rejoiner.beforeRequest()).toBeNull() // in the cluster again: nothing to do
  })

  it('takes discovered agents that are idle and not in the cluster, first answering address each', async () => {
    const cluster = new FakeCluster([{ device: 1, address: 'A', peer: 'pa' }])
    cluster.up = new Set(['C2', 'D'])
    const probed: string[] = []
    const answers: Record<string, AgentProbe> = {
      C2: { peer: 'pc', address: 'C2', profile: profile(false), rttMs: 1 },
      D: { peer: 'pd', address: 'D', profile: profile(false), rttMs: 1 },
      E: { peer: 'pe', address: 'E', profile: profile(true), rttMs: 1 },
      A2: { peer: 'pa', address: 'A2', profile: profile(false), rttMs: 1 },
    }
    const source: AgentSource = {
      candidates: () => [
        { peer: 'pa', addresses: ['A'] }, // in the cluster: not probed
        { peer: 'pc', addresses: ['C1', 'C2'] }, // C1 does not answer
        { peer: null, addresses: ['D'] }, // a bootstrap address
        { peer: null, addresses: ['E'] }, // busy with another master
        { peer: null, addresses: ['A2'] }, // the cluster's worker A at another address
      ],
      probe: async (address) => {
        probed.push(address)
        const answer = answers[address]
        if (!answer) throw new Error('connection refused')
        return answer
      },
    }
    const rejoiner = new Rejoiner(cluster, { addresses: ['A'], discovery: source })
    const report = await rejoiner.beforeRequest()
    expect(probed.sort()).toEqual(['A2', 'C1', 'C2', 'D', 'E'])
    expect(cluster.calls).toEqual([['C2', 'D']])
    expect(report!.admitted.map((w) => w.address)).toEqual(['C2', 'D'])
  })
})
