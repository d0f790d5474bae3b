/** The userspace link emulator over real libp2p channels on 127.0.0.1. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type FramedChannel, parseLinkEmulation, ShapedChannel, TransportNode } from '../../transport/index.ts'

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
