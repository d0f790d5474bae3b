/**
 * The split protocol over real libp2p nodes on 127.0.0.1 (noise + yamux): a tail server and a head client in this
 * process, on the BottleFit student and real Fashion-MNIST images.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { SplitHeadClient } from '../../../agent/split/head-client.ts'
import { defaultMetric, predictions, profileCandidates, sliceItems, splitOptions } from '../../../agent/split/profile.ts'
import { SplitModel } from '../../../agent/split/split-model.ts'
import { SplitTailServer } from '../../../agent/split/tail-server.ts'
import { type CutCandidate, type Observation, planSplit, Replanner } from '../../../splitter/index.ts'
import { encodeBottleneck, parseCodec, SPLIT_PROTOCOL, TransportNode } from '../../../transport/index.ts'
import { BOTTLEFIT, fmnistItems, HAVE_FMNIST, maxAbsDiff, TEACHER } from './split-helpers.ts'

describe.skipIf(!HAVE_FMNIST)('split protocol between a head client and a tail server', () => {
  let model: SplitModel
  let server: SplitTailServer
  let address: string
  let observation: Observation
  let candidates: CutCandidate[]
  const clients: SplitHeadClient[] = []
  const x = fmnistItems(200, 8)

  beforeAll(async () => {
    model = await SplitModel.load(BOTTLEFIT)
    server = new SplitTailServer(await SplitModel.load(BOTTLEFIT), { listen: ['/ip4/127.0.0.1/tcp/0'] })
    await server.start()
    address = server.multiaddrs()[0]!
    observation = (await model.probe({ input: x })).observation
    candidates = model.candidates(observation)
  })

  afterAll(async () => {
    for (const c of clients) await c.close().catch(() => {})
    await server.stop()
    await model.release()
  })

  async function connect(options: Parameters<typeof SplitHeadClient.connect>[2] = {}): Promise<SplitHeadClient> {
    const client = await SplitHeadClient.connect(model, address, { signal: AbortSignal.timeout(20_000), ...options })
    clients.push(client)
    return client
  }

  const byCrossing = (name: string) => candidates.find((c) => c.crossing.length === 1 && c.crossing[0] === name)!

  it('runs the head here and the tail there: f32 equals the local model, 8-bit agrees on the classes', async () => {
    const client = await connect()
    const local = (await (await model.fullSession()).run({ input: x })).logits!
    await client.setCut({ candidate: byCrossing('bottleneck'), codec: parseCodec('f32') }, observation)
    const exact = await client.infer({ input: x })
    expect(maxAbsDiff(exact.outputs.logits!.data, local.data)).toBeLessThanOrEqual(1e-5)
    expect(exact.timing.requestBytes).toBe(8 + 8 + 8 * 196 * 4) // prefix, descriptor, f32 data
    await client.setCut({ candidate: byCrossing('bottleneck'), codec: parseCodec('q8+deflate') }, observation)
    const q8 = await client.infer({ input: x })
    expect(predictions(q8.outputs.logits!, { kind: 'top1' })).toEqual(predictions(local, { kind: 'top1' }))
    expect(q8.timing.requestBytes).toBeLessThan(8 * 196 + 40)
    // offload and local-only through the same client
    await client.setCut({ candidate: candidates[0]!, codec: parseCodec('f32+zstd') }, observation)
    expect(maxAbsDiff((await client.infer({ input: x })).outputs.logits!.data, local.data)).toBeLessThanOrEqual(1e-5)
    await client.setCut({ candidate: candidates.at(-1)!, codec: parseCodec('f32') }, observation)
    const here = await client.infer({ input: x })
    expect(here.timing.requestBytes).toBe(0)
    expect(here.outputs.logits!.data).toEqual(local.data)
  })

  it('refuses an invalid cut by name and goes on with the next one', async () => {
    const client = await connect()
    const unknown: CutCandidate = { index: -1, kind: 'cut', after: null, afterOp: null, crossing: ['no_such_tensor'], bytes: 0, bytesPerItem: 0 }
    await expect(client.setCut({ candidate: unknown, codec: parseCodec('q8') }, observation)).rejects.toMatchObject({ name: 'CutError' })
    // a cut that is no topological prefix but still valid: the stage-2 output alone
    await client.setCut({ candidate: { ...unknown, crossing: ['stage2_out'] }, codec: parseCodec('q8') }, observation)
    expect((await client.infer({ input: sliceItems(x, 0, 2) })).outputs.logits!.dims).toEqual([2, 10])
  })

  it('refuses a server that holds another model, naming both', async () => {
    const other = new SplitTailServer(await SplitModel.load(TEACHER), { listen: ['/ip4/127.0.0.1/tcp/0'] })
    await other.start()
    try {
      await expect(SplitHeadClient.connect(model, other.multiaddrs()[0]!)).rejects.toMatchObject({
        name: 'SplitProtocolError',
        remoteName: 'SplitProtocolError',
        message: expect.stringMatching(/both sides need the same file/),
      })
    } finally {
      await other.stop()
    }
  })

  it('answers a corrupt bottleneck payload with a CodecError frame', async () => {
    const node = new TransportNode()
    await node.start()
    try {
      const channel = await node.dial(address, SPLIT_PROTOCOL)
      await channel.send({ type: 'hello', model: model.sha256 })
      expect((await channel.read())!.header.type).toBe('hello')
      await channel.send({ type: 'cut', id: 1, crossing: ['bottleneck'], observed: [], batch: 1 })
      expect((await channel.read())!.header).toMatchObject({ type: 'cut', id: 1, tailNodes: 23 })
      await channel.send({ type: 'cut', id: 3, crossing: ['no_such_tensor'], observed: [], batch: 1 })
      expect((await channel.read())!.header).toMatchObject({ type: 'error', id: 3, name: 'CutError', message: expect.stringMatching(/no_such_tensor/) })
      const payload = encodeBottleneck([{ type: 'float32', dims: [1, 4, 7, 7], data: new Float32Array(196) }], parseCodec('q8'))
      payload[20]! ^= 0xff
      await channel.send({ type: 'infer', id: 2, cut: 1 }, payload)
      expect((await channel.read())!.header).toMatchObject({ type: 'error', id: 2, name: 'CodecError', message: expect.stringMatching(/checksum mismatch/) })
      await channel.send({ type: 'frobnicate' })
      expect((await channel.read())!.header).toMatchObject({ type: 'error', name: 'SplitProtocolError' })
    } finally {
      await node.stop()
    }
  })

  it('measures an emulated link: at least its round trip, at most its rate', async () => {
    const client = await connect({ link: { rttMs: 10, bitsPerSecond: 8e6 } })
    const link = await client.measureLink({ maxProbeBytes: 256 * 1024 })
    expect(link.rttMs).toBeGreaterThanOrEqual(10)
    expect(link.bitsPerSecond).toBeLessThanOrEqual(8e6 * 1.25)
    expect(link.bitsPerSecond).toBeGreaterThan(0)
  })

  it('has the server time its tails, and re-plans when the measured link moves', async () => {
    const client = await connect({ link: { rttMs: 20, bitsPerSecond: 1e6 } })
    const calibration = { input: fmnistItems(0, 32) }
    const bottleneck = byCrossing('bottleneck')
    const profile = await profileCandidates(model, { calibration, codecs: ['f32', 'q8'].map(parseCodec), candidates: [bottleneck.index], repeats: 3 })
    expect(profile.candidates.map((c) => c.candidate.kind)).toEqual(['offload', 'cut', 'local'])
    const server = await client.profileServer(
      profile.candidates.map((c) => c.candidate),
      { input: sliceItems(calibration.input, 0, 1) },
      observation,
      { repeats: 3 },
    )
    expect([...server.tailMs.keys()]).toEqual([0, bottleneck.index])
    expect(server.fullMs).toBeGreaterThan(0)
    // planned for a fast link; the real (emulated) link is 1 Mbit/s with 20 ms: the measurement moves it far enough
    const device = { name: 'small', slowdown: 10, memoryBytes: 512 * 1024 }
    const input = { options: splitOptions(profile, server.tailMs), link: { rttMs: 0.1, bitsPerSecond: 10e9 }, device }
    const replanner = new Replanner(input, 0.5)
    const measured = await client.measureLink({ maxProbeBytes: 64 * 1024 })
    const next = replanner.observe(measured)
    expect(next).toBeDefined()
    expect(next!.link).toEqual(measured)
    expect(next!.choice).toEqual(planSplit({ ...input, link: measured }).choice)
    expect(replanner.observe(measured)).toBeUndefined() // the new plan's link is the reference now
    const chosen = candidates[next!.choice.candidate]!
    await client.setCut({ candidate: chosen, codec: parseCodec(next!.choice.codec === '-' ? 'f32' : next!.choice.codec) }, observation)
    const y = await client.infer({ input: sliceItems(x, 0, 1) })
    expect(predictions(y.outputs.logits!, defaultMetric(model))).toHaveLength(1)
    if (chosen.kind !== 'local') expect(y.timing.roundTripMs).toBeGreaterThanOrEqual(20)
  })
})
