import { afterEach, describe, expect, it } from 'vitest'
import {
  type Allreduce,
  type AllreduceLink,
  createInProcessAllreduce,
  encodeFrame,
  type Frame,
  FrameDecoder,
  type FrameHeader,
  StarAllreduceHub,
  StarAllreduceMember,
} from '../../transport/index.ts'
import { decodeF16, encodeF16, roundToF16InPlace } from '../../transport/f16.ts'
import { randomF32, randomInt, referenceSum, seededRandom, type StarCluster, startStarCluster } from './helpers.ts'

/** An in-memory link that records what was sent (unit tier: no network). */
class RecordingLink implements AllreduceLink {
  readonly sent: Frame[] = []
  readonly peer: string
  constructor(peer: string) {
    this.peer = peer
  }
  async send(header: FrameHeader, body?: ArrayBufferView | null): Promise<void> {
    const parts = encodeFrame(header, body)
    const bytes = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0))
    let at = 0
    for (const p of parts) {
      bytes.set(p, at)
      at += p.byteLength
    }
    this.sent.push(...new FrameDecoder().push(bytes))
  }
}

/** An 'ar' frame as it would arrive from the wire (`f16`: the partial sent as binary16). */
function arFrame(tag: number, partial: Float32Array | null, f16 = false): Frame {
  const parts = f16
    ? encodeFrame({ type: 'ar', tag, dtype: 'f16' }, partial === null ? null : encodeF16(partial))
    : encodeFrame({ type: 'ar', tag }, partial)
  const bytes = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0))
  let at = 0
  for (const p of parts) {
    bytes.set(p, at)
    at += p.byteLength
  }
  return new FrameDecoder().push(bytes)[0]!
}

describe('createInProcessAllreduce', () => {
  it('sums 1..4 members with null partials exactly, in member order', async () => {
    const random = seededRandom(3)
    for (let n = 1; n <= 4; n++) {
      const group = createInProcessAllreduce(n)
      for (let round = 0; round < 20; round++) {
        const length = randomInt(random, 1, 2000)
        const partials = group.map((_, i): Float32Array | null => (n > 1 && (round + i) % 3 === 0 ? null : randomF32(random, length)))
        if (!partials.some((p) => p !== null)) partials[0] = randomF32(random, length)
        const expected = referenceSum(partials, length)
        // members call in a shuffled order; the sum order stays 0, 1, 2, ...
        const order = group.map((_, i) => i).sort(() => random() - 0.5)
        const results: Float32Array[] = new Array(n)
        await Promise.all(
          order.map(async (i) => {
            results[i] = await group[i]!.allreduce(round % 5, partials[i]!)
          }),
        )
        for (const r of results) expect(r).toEqual(expected)
        if (n > 1) expect(results[0]).not.toBe(results[1]) // each member owns its result
      }
    }
  })

  it('rejects mismatched lengths and rounds nobody contributed to with AllreduceError', async () => {
    const [a, b] = createInProcessAllreduce(2) as [Allreduce, Allreduce]
    const results = await Promise.allSettled([a.allreduce(1, new Float32Array(4)), b.allreduce(1, new Float32Array(5))])
    for (const r of results) expect(r).toMatchObject({ status: 'rejected', reason: { name: 'AllreduceError' } })
    expect((results[0] as PromiseRejectedResult).reason.message).toMatch(/5 f32.*4/)
    const none = await Promise.allSettled([a.allreduce(2, null), b.allreduce(2, null)])
    for (const r of none) expect(r).toMatchObject({ status: 'rejected', reason: { name: 'AllreduceError' } })
  })

  it('withdraws the partial of an aborted call so the tag can be retried', async () => {
    const [a, b] = createInProcessAllreduce(2) as [Allreduce, Allreduce]
    const controller = new AbortController()
    const aborted = a.allreduce(7, new Float32Array([1]), { signal: controller.signal })
    controller.abort(new Error('stop'))
    await expect(aborted).rejects.toThrow('stop')
    const [ra, rb] = await Promise.all([a.allreduce(7, new Float32Array([2])), b.allreduce(7, new Float32Array([3]))])
    expect(Array.from(ra)).toEqual([5])
    expect(Array.from(rb)).toEqual([5])
  })
})

describe('StarAllreduceHub / StarAllreduceMember (in-memory links)', () => {
  it('buffers partials that arrive before the hub calls allreduce, and sends one sum frame per member', async () => {
    const links = [new RecordingLink('w0'), new RecordingLink('w1')]
    const hub = new StarAllreduceHub(links)
    hub.deliver(1, arFrame(5, new Float32Array([10, 20])))
    hub.deliver(0, arFrame(5, null))
    const sum = await hub.allreduce(5, new Float32Array([1, 2]))
    expect(Array.from(sum)).toEqual([11, 22])
    for (const link of links) {
      expect(link.sent).toHaveLength(1)
      expect(link.sent[0]!.header).toEqual({ type: 'ar', tag: 5 })
      expect(Array.from(new Float32Array(link.sent[0]!.body.slice().buffer))).toEqual([11, 22])
    }
  })

  it('rejects mismatched partial lengths with AllreduceError naming the peer and lengths', async () => {
    const hub = new StarAllreduceHub([new RecordingLink('peerA'), new RecordingLink('peerB')])
    hub.deliver(0, arFrame(1, new Float32Array(3)))
    hub.deliver(1, arFrame(1, new Float32Array(4)))
    const err = await hub.allreduce(1, new Float32Array(3)).catch((e: Error) => e)
    expect(err).toMatchObject({ name: 'AllreduceError' })
    expect((err as Error).message).toMatch(/peerB.*4.*peerA.*3/)
    const hub2 = new StarAllreduceHub([new RecordingLink('peerC')])
    hub2.deliver(0, arFrame(1, new Float32Array(3)))
    const err2 = await hub2.allreduce(1, new Float32Array(2)).catch((e: Error) => e)
    expect((err2 as Error).message).toMatch(/hub.*2 f32.*peerC.*3/)
  })

  it('rejects a member frame with a bad tag or a ragged body with FrameError', () => {
    const hub = new StarAllreduceHub([new RecordingLink('peerA')])
    const noTag = new FrameDecoder().push(encodeFrame({ type: 'ar' })[0]!)[0]!
    expect(() => hub.deliver(0, noTag)).toThrow(expect.objectContaining({ name: 'FrameError' }))
    const ragged = { header: { type: 'ar', tag: 1 }, body: new Uint8Array(6) }
    expect(() => hub.deliver(0, ragged)).toThrow(expect.objectContaining({ name: 'FrameError' }))
    expect(() => hub.deliver(3, arFrame(1, null))).toThrow(RangeError)
  })

  it('fail() rejects pending and later allreduces with PeerGoneError naming the member', async () => {
    const hub = new StarAllreduceHub([new RecordingLink('peerA'), new RecordingLink('peerB')])
    hub.deliver(0, arFrame(1, new Float32Array(2)))
    const pending = hub.allreduce(1, new Float32Array(2))
    hub.fail(1, new Error('socket closed'))
    await expect(pending).rejects.toMatchObject({ name: 'PeerGoneError', peer: 'peerB' })
    await expect(hub.allreduce(2, null)).rejects.toMatchObject({ name: 'PeerGoneError' })
  })

  it('a deadline fails the round with PeerStalledError naming the silent member; rounds in time are unaffected', async () => {
    const hub = new StarAllreduceHub([new RecordingLink('peerA'), new RecordingLink('peerB')], { deadlineMs: 50 })
    hub.deliver(0, arFrame(1, new Float32Array([1])))
    hub.deliver(1, arFrame(1, new Float32Array([2])))
    expect(Array.from(await hub.allreduce(1, new Float32Array([3])))).toEqual([6])
    hub.deliver(0, arFrame(2, new Float32Array([1])))
    const started = performance.now()
    const err = await hub.allreduce(2, new Float32Array([3])).catch((e: Error) => e)
    expect(performance.now() - started).toBeGreaterThanOrEqual(45)
    expect(err).toMatchObject({ name: 'PeerStalledError', peer: 'peerB' })
    expect((err as Error).message).toBe('allreduce member 1 (peer peerB) sent no partial for tag 2 within 50 ms')
    // A per-call deadline overrides the hub's; a bad one is a TypeError.
    hub.deliver(0, arFrame(3, null))
    await expect(hub.allreduce(3, new Float32Array(1), { deadlineMs: 5 })).rejects.toMatchObject({ name: 'PeerStalledError', peer: 'peerB' })
    await expect(hub.allreduce(4, null, { deadlineMs: -1 })).rejects.toThrow(TypeError)
  })

  it('member sends its partial (empty body for null) and resolves on the sum with its tag', async () => {
    const link = new RecordingLink('hub')
    const member = new StarAllreduceMember(link)
    const a = member.allreduce(3, new Float32Array([1, 2]))
    const b = member.allreduce(4, null)
    await Promise.resolve()
    expect(link.sent.map((f) => [f.header.tag, f.body.byteLength])).toEqual([
      [3, 8],
      [4, 0],
    ])
    member.deliver(arFrame(4, new Float32Array([7])))
    member.deliver(arFrame(3, new Float32Array([5, 6])))
    expect(Array.from(await a)).toEqual([5, 6])
    expect(Array.from(await b)).toEqual([7])
    const c = member.allreduce(5, new Float32Array(2))
    member.fail(new Error('gone'))
    await expect(c).rejects.toMatchObject({ name: 'PeerGoneError', peer: 'hub' })
  })
})

/** The f16-wire sum as the star computes it: hub partial exact, members' partials and the sum rounded to f16. */
function f16WireSum(partials: readonly (Float32Array | null)[], n: number): Float32Array {
  const rounded = partials.map((p, i) => {
    if (p === null || i === 0) return p
    const r = p.slice()
    roundToF16InPlace(r)
    return r
  })
  const sum = referenceSum(rounded, n)
  roundToF16InPlace(sum)
  return sum
}

/** Activation-like values: roughly normal (sum of 4 uniforms), scale 0.5, one outlier of ±30 in 512. */
function activations(random: () => number, n: number): Float32Array {
  const out = new Float32Array(n)
  for (let k = 0; k < n; k++) {
    const normal = random() + random() + random() + random() - 2
    out[k] = random() < 1 / 512 ? (random() < 0.5 ? -30 : 30) : 0.5 * normal
  }
  return out
}

describe('wireDtype f16', () => {
  let cluster: StarCluster | undefined
  afterEach(async () => {
    await cluster?.stop()
    cluster = undefined
  })

  it('sends f16 partials and sums, sums in f32, and gives the hub exactly the sum the members get', async () => {
    const links = [new RecordingLink('w0'), new RecordingLink('w1')]
    const hub = new StarAllreduceHub(links, { wireDtype: 'f16' })
    const own = new Float32Array([1.0001, 2, -3])
    const p0 = new Float32Array([0.1, 1e5, 7])
    const p1 = new Float32Array([1e-3, 0.5, 0.333])
    hub.deliver(0, arFrame(9, p0, true))
    hub.deliver(1, arFrame(9, p1, true))
    const sum = await hub.allreduce(9, own)
    expect(Array.from(sum)).toEqual(Array.from(f16WireSum([own, p0, p1], 3)))
    for (const link of links) {
      expect(link.sent[0]!.header).toEqual({ type: 'ar', tag: 9, dtype: 'f16' })
      expect(link.sent[0]!.body.byteLength).toBe(6)
      const got = decodeF16(new Uint16Array(link.sent[0]!.body.slice().buffer))
      expect(Array.from(got)).toEqual(Array.from(sum))
    }

    const memberLink = new RecordingLink('hub')
    const member = new StarAllreduceMember(memberLink, { wireDtype: 'f16' })
    const pending = member.allreduce(2, p1)
    await Promise.resolve()
    expect(memberLink.sent[0]!.header).toEqual({ type: 'ar', tag: 2, dtype: 'f16' })
    expect(Array.from(new Uint16Array(memberLink.sent[0]!.body.slice().buffer))).toEqual(Array.from(encodeF16(p1)))
    member.deliver(arFrame(2, sum, true))
    expect(Array.from(await pending)).toEqual(Array.from(sum))
  })

  it('accepts either dtype from any peer, and rejects unknown dtypes and ragged f16 bodies with FrameError', async () => {
    const hub = new StarAllreduceHub([new RecordingLink('a'), new RecordingLink('b')]) // sends f32
    hub.deliver(0, arFrame(1, new Float32Array([0.1, 2]), true))
    hub.deliver(1, arFrame(1, new Float32Array([0.1, 2])))
    const sum = await hub.allreduce(1, null)
    expect(Array.from(sum)).toEqual([Math.fround(Math.fround(decodeF16(encodeF16(new Float32Array([0.1])))[0]!) + Math.fround(0.1)), 4])
    const unknown = { header: { type: 'ar', tag: 2, dtype: 'bf16' }, body: new Uint8Array(4) }
    expect(() => hub.deliver(0, unknown)).toThrow(expect.objectContaining({ name: 'FrameError', message: expect.stringContaining('bf16') }))
    const ragged = { header: { type: 'ar', tag: 2, dtype: 'f16' }, body: new Uint8Array(3) }
    expect(() => hub.deliver(0, ragged)).toThrow(expect.objectContaining({ name: 'FrameError' }))
    expect(() => new StarAllreduceMember(new RecordingLink('h'), { wireDtype: 'f8' as never })).toThrow(TypeError)
  })

  it('over libp2p: identical sums at all 4 peers, equal to the in-process f16 group; error 2.6e-4 of max |sum|', async () => {
    cluster = await startStarCluster(3, { wireDtype: 'f16' })
    const { hub, members } = cluster
    const group = createInProcessAllreduce(4, { wireDtype: 'f16' })
    const random = seededRandom(17)
    const n = 8192
    let worstRelative = 0 // max |f16-wire sum − exact f32 sum| / max |exact sum|, over rounds
    let sumAbsError = 0
    let sumAbs = 0
    for (let round = 0; round < 40; round++) {
      const partials = [0, 1, 2, 3].map((i): Float32Array | null => (round % 10 === i + 1 ? null : activations(random, n)))
      const results = await Promise.all([
        hub.allreduce(round, partials[0]!),
        ...members.map((m, i) => m.allreduce(round, partials[i + 1]!)),
      ])
      const local = await Promise.all(group.map((m, i) => m.allreduce(round, partials[i]!)))
      const want = f16WireSum(partials, n)
      for (const r of [...results, ...local]) expect(r).toEqual(want)
      const exact = referenceSum(partials, n)
      let maxAbs = 0
      let maxError = 0
      for (let k = 0; k < n; k++) {
        maxAbs = Math.max(maxAbs, Math.abs(exact[k]!))
        maxError = Math.max(maxError, Math.abs(want[k]! - exact[k]!))
        sumAbsError += Math.abs(want[k]! - exact[k]!)
        sumAbs += Math.abs(exact[k]!)
      }
      worstRelative = Math.max(worstRelative, maxError / maxAbs)
    }
    // measured on this seed: worst 2.6e-4 of max |exact sum| in a round, mean |error| / mean |exact sum| = 2.1e-4
    // (each f16 rounding is within 2^-11 ≈ 4.9e-4 relative; a sum carries the members' roundings and its own)
    expect(worstRelative).toBeLessThan(4e-4)
    expect(sumAbsError / sumAbs).toBeLessThan(3e-4)
  })
})

describe('star allreduce over libp2p on 127.0.0.1 (hub + 3 workers)', () => {
  let cluster: StarCluster | undefined
  afterEach(async () => {
    await cluster?.stop()
    cluster = undefined
  })

  it('200 sequential allreduces of 8192 f32 give exact sums at every member', async () => {
    cluster = await startStarCluster(3)
    const { hub, members } = cluster
    const random = seededRandom(11)
    const n = 8192
    for (let round = 0; round < 200; round++) {
      // some sync points have members (or the hub) that contribute nothing
      const partials = [0, 1, 2, 3].map((i): Float32Array | null => (round % 10 === i + 1 ? null : randomF32(random, n)))
      const expected = referenceSum(partials, n)
      const tag = round % 4 // tags are reused once their round completed
      const results = await Promise.all([
        hub.allreduce(tag, partials[0]!),
        ...members.map((m, i) => m.allreduce(tag, partials[i + 1]!)),
      ])
      for (const r of results) expect(r).toEqual(expected)
    }
  })

  it('rejects the hub pending allreduce with PeerGoneError naming the member that went away', async () => {
    cluster = await startStarCluster(3)
    const { hub, members, workers } = cluster
    const gonePeer = workers[2]!.peerId
    const pending = hub.allreduce(1, new Float32Array(16))
    pending.catch(() => {}) // observed below
    // workers 0 and 1 contribute and then wait for a sum that never comes (rejected when the cluster stops)
    for (const member of members.slice(0, 2)) member.allreduce(1, new Float32Array(16)).catch(() => {})
    await workers[2]!.stop()
    const err = await pending.catch((e: Error) => e)
    expect(err).toMatchObject({ name: 'PeerGoneError', peer: gonePeer })
    expect((err as Error).message).toContain(gonePeer)
  })
})
