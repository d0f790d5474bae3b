/** The userspace link emulator over real libp2p channels on 127.0.0.1. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type FramedChannel, LinkShaper, parseLinkEmulation, ShapedChannel, TransportNode } from '../../transport/index.ts'

const PROTOCOL = '/edgeshard/test-shaper/1.0.0'

describe('parseLinkEmulation', () => {
  it('reads rate and round trip', () => {
    expect(parseLinkEmulation('1mbit:20ms')).toEqual({ bitsPerSecond: 1e6, rttMs: 20 })
    expect(parseLinkEmulation('1gbit:1ms')).toEqual({ bitsPerSecond: 1e9, rttMs: 1 })
    expect(parseLinkEmulation('500kbit/s:80.5ms')).toEqual({ bitsPerSecond: 5e5, rttMs: 80.5 })
    expect(() => parseLinkEmulation('fast')).toThrow(/invalid link 'fast'/)
    expect(() => parseLinkEmulation('0mbit:1ms')).toThrow(/rate must be positive/)
  })
})

describe('ShapedChannel', () => {
  const a = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
  const b = new TransportNode()
  let inbound: Promise<FramedChannel>
  let outbound: FramedChannel

  beforeAll(async () => {
    await Promise.all([a.start(), b.start()])
    const ready = Promise.withResolvers<FramedChannel>()
    inbound = ready.promise
    await a.handle(PROTOCOL, (channel) => ready.resolve(channel))
    outbound = await b.dial(a.multiaddrs()[0]!, PROTOCOL)
  })

  afterAll(async () => {
    await Promise.all([a.stop(), b.stop()])
  })

  it('delays each frame by its serialisation time at the rate plus half the round trip, keeping order', async () => {
    const shaped = new ShapedChannel(outbound, { rttMs: 40, bitsPerSecond: 1e6 })
    const receiver = await inbound
    const t0 = performance.now()
    const sends = [shaped.send({ type: 'x', n: 1 }, new Uint8Array(12_500)), shaped.send({ type: 'x', n: 2 }, new Uint8Array(12_500)), shaped.send({ type: 'x', n: 3 })]
    const got: number[] = []
    for (let i = 0; i < 3; i++) got.push((await receiver.read())!.header.n as number)
    const elapsedMs = performance.now() - t0
    await Promise.all(sends)
    expect(got).toEqual([1, 2, 3])
    // two 12.5 kB frames at 1 Mbit/s take 200 ms on the wire, plus 20 ms one way
    expect(elapsedMs).toBeGreaterThanOrEqual(220)
  })

  it('refuses a link without a positive rate', () => {
    expect(() => new ShapedChannel(outbound, { rttMs: 1, bitsPerSecond: 0 })).toThrow(RangeError)
  })
})

describe('emulated links on real libp2p streams (FramedChannelOptions.linkShaper on both nodes)', () => {
  const RTT_MS = 20
  const BITS_PER_SECOND = 40e6
  const ECHO = '/edgeshard/test-echo/1.0.0'
  // Each node shapes what it sends to the other: one LinkShaper per direction, looked up by the remote peer id.
  const shapers = new Map<string, LinkShaper>()
  const a = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'], linkShaper: (peer) => shapers.get(peer) })
  const b = new TransportNode({ linkShaper: (peer) => shapers.get(peer) })
  let channel: FramedChannel
  const median = (values: number[]): number => values.sort((x, y) => x - y)[Math.floor(values.length / 2)]!

  beforeAll(async () => {
    await Promise.all([a.start(), b.start()])
    await a.handle(ECHO, async (ch) => {
      for await (const frame of ch) await ch.send({ type: 'pong', bytes: frame.body.byteLength })
      await ch.close()
    })
    channel = await b.dial(a.multiaddrs()[0]!, ECHO)
    await channel.send({ type: 'ping' }) // opens the stream unshaped
    await channel.read()
    shapers.set(a.peerId, new LinkShaper({ rttMs: RTT_MS, bitsPerSecond: BITS_PER_SECOND }))
    shapers.set(b.peerId, new LinkShaper({ rttMs: RTT_MS, bitsPerSecond: BITS_PER_SECOND }))
  })

  afterAll(async () => {
    await Promise.all([a.stop(), b.stop()])
  })

  it('gives round trips within 20 % of the emulated one (the real stack’s latency is part of it)', async () => {
    const rttsMs: number[] = []
    for (let i = 0; i < 15; i++) {
      const t0 = performance.now()
      await channel.send({ type: 'ping' })
      await channel.read()
      rttsMs.push(performance.now() - t0)
    }
    expect(Math.abs(median(rttsMs) - RTT_MS) / RTT_MS).toBeLessThan(0.2)
  })

  it('gives a throughput within 20 % of the emulated rate, and send waits for the frame to leave', async () => {
    const bytes = 1_000_000 // 200 ms at 40 Mbit/s
    const rates: number[] = []
    for (let i = 0; i < 3; i++) {
      const t0 = performance.now()
      await channel.send({ type: 'data' }, new Uint8Array(bytes))
      const sentMs = performance.now() - t0
      expect(sentMs).toBeGreaterThan(0.8 * ((bytes * 8) / BITS_PER_SECOND) * 1e3)
      const reply = await channel.read()
      expect(reply?.header.bytes).toBe(bytes)
      rates.push((bytes * 8) / ((performance.now() - t0 - RTT_MS) / 1e3))
    }
    expect(Math.abs(median(rates) - BITS_PER_SECOND) / BITS_PER_SECOND).toBeLessThan(0.2)
  })

  it('keeps frames in order and ends the stream only after the frames still on the link', async () => {
    const ordered = await b.dial(a.multiaddrs()[0]!, ECHO)
    const t0 = performance.now()
    for (let n = 0; n < 5; n++) await ordered.send({ type: 'x', n }, new Uint8Array(1000 * n))
    const closing = ordered.close()
    const got: number[] = []
    for await (const frame of ordered) got.push(frame.header.bytes as number)
    await closing
    expect(got).toEqual([0, 1000, 2000, 3000, 4000])
    expect(performance.now() - t0).toBeGreaterThanOrEqual(RTT_MS)
  })
})
