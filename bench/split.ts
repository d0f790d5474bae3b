/**
 * Split-computing benchmark (BottleFit student by default): profiles every candidate cut on this machine — head ms,
 * tail ms, payload bytes and encode/decode ms per codec, top-1 agreement on test-a — then, for three emulated link
 * profiles, the predicted transfer and total ms of every cut and codec beside local-only and offload, the planner's
 * choice for three devices, and end-to-end measurements over a real libp2p link shaped in userspace (tail server in
 * this process, 127.0.0.1) for local, offload and the bottleneck. Prints one JSON document.
 *
 * Usage: `npm run bench:split [-- --model M --calibration 256 --requests 20]`
 */
import { existsSync, readFileSync } from 'node:fs'
import { cpus, loadavg } from 'node:os'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { SplitHeadClient } from '../agent/split/head-client.ts'
import { type ModelProfile, profileCandidates, sliceItems, splitOptions } from '../agent/split/profile.ts'
import { SplitModel } from '../agent/split/split-model.ts'
import { SplitTailServer } from '../agent/split/tail-server.ts'
import { type DeviceProfile, type LinkProfile, planSplit, predict, type SplitOption } from '../splitter/index.ts'
import { codecName, parseCodec } from '../transport/index.ts'

const MODELS = fileURLToPath(new URL('../../shared/models/', import.meta.url))
const { values } = parseArgs({
  options: {
    model: { type: 'string', default: `${MODELS}fmnist-bottlefit.onnx` },
    input: { type: 'string', default: `${MODELS}fmnist-test-a.bin` },
    calibration: { type: 'string', default: '256' },
    requests: { type: 'string', default: '20' },
    codecs: { type: 'string', default: 'f32,f16,q8,q8c,q4,q8+deflate,q8+brotli,q8+zstd,q4+deflate' },
  },
})
for (const path of [values.model, values.input]) {
  if (!existsSync(path)) {
    console.error(`bench: ${path} not found`)
    process.exit(2)
  }
}

const LINKS: { name: string; link: LinkProfile }[] = [
  { name: '1mbit:20ms', link: { bitsPerSecond: 1e6, rttMs: 20 } },
  { name: '20mbit:10ms', link: { bitsPerSecond: 20e6, rttMs: 10 } },
  { name: '1gbit:1ms', link: { bitsPerSecond: 1e9, rttMs: 1 } },
]
const DEVICES: DeviceProfile[] = [
  { name: 'this machine', slowdown: 1 },
  { name: 'small device (2x slower, 512 KB)', slowdown: 2, memoryBytes: 512 * 1024 },
  { name: 'slow device (50x slower)', slowdown: 50 },
]

const calibrationItems = Number(values.calibration)
const pixels = readFileSync(values.input).subarray(0, calibrationItems * 784)
const input = { type: 'float32' as const, dims: [calibrationItems, 1, 28, 28], data: Float32Array.from(pixels, (p) => (p / 255 - 0.2860406) / 0.3530242) }
const model = await SplitModel.load(values.model)
const codecs = values.codecs.split(',').map(parseCodec)
const loadBefore = loadavg()[0]!
const profile: ModelProfile = await profileCandidates(model, { calibration: { input }, codecs, repeats: 15 })
const options: SplitOption[] = splitOptions(profile)
const round = (v: number, d = 4): number => Math.round(v * 10 ** d) / 10 ** d

const cuts = profile.candidates.map((c) => ({
  index: c.candidate.index,
  kind: c.candidate.kind,
  crossing: c.candidate.crossing,
  headMs: round(c.headMs),
  tailMs: round(c.tailMs),
  deviceBytes: c.deviceBytes,
  codecs: Object.fromEntries(c.codecs.map((k) => [k.codec, { bytes: k.bytes, encodeMs: round(k.encodeMs), decodeMs: round(k.decodeMs), agreement: round(k.agreement) }])),
}))

// end-to-end over a shaped libp2p link: a tail server in this process
const server = new SplitTailServer(await SplitModel.load(values.model), { listen: ['/ip4/127.0.0.1/tcp/0'] })
await server.start()
const { observation } = await model.probe({ input: sliceItems(input, 0, 1) })
const candidates = model.candidates(observation)
const bottleneck = candidates.find((c) => c.crossing.length === 1 && c.crossing[0] === 'bottleneck')

const links = []
for (const { name, link } of LINKS) {
  const machine = DEVICES[0]!
  const rows = profile.candidates.map((c) => {
    const mine = options.filter((o) => o.candidate === c.candidate.index)
    const predicted = mine.map((o) => predict(o, link, machine, machine))
    const best = predicted.filter((p) => p.agreement >= 0.99).sort((a, b) => a.totalMs - b.totalMs)[0]
    return {
      index: c.candidate.index,
      kind: c.candidate.kind,
      label: mine[0]?.label,
      headMs: round(c.headMs),
      tailMs: round(c.tailMs),
      transferMs: Object.fromEntries(predicted.map((p) => [p.codec, round(p.transferMs)])),
      totalMs: Object.fromEntries(predicted.map((p) => [p.codec, round(p.totalMs)])),
      best: best ? { codec: best.codec, totalMs: round(best.totalMs), bytes: best.bytes } : null,
    }
  })
  const choices = DEVICES.map((device) => {
    const plan = planSplit({ options, link, device })
    const c = plan.choice
    return { device: device.name, choice: { index: c.candidate, kind: c.kind, label: c.label, codec: c.codec, bytes: c.bytes, totalMs: round(c.totalMs), agreement: c.agreement } }
  })
  // measured: requests over the shaped link, one image each (median ms)
  const client = await SplitHeadClient.connect(model, server.multiaddrs()[0]!, { link })
  const measured = []
  const offloadBest = rows[0]?.best
  const probes: { label: string; index: number; codec: string }[] = [
    { label: 'local', index: candidates.length - 1, codec: 'f32' },
    ...(offloadBest ? [{ label: 'offload', index: 0, codec: offloadBest.codec }] : []),
    ...(bottleneck ? [{ label: 'bottleneck', index: bottleneck.index, codec: 'q8' }] : []),
  ]
  for (const p of probes) {
    const candidate = candidates[p.index]!
    await client.setCut({ candidate, codec: parseCodec(p.codec) }, observation)
    const times: number[] = []
    let bytes = 0
    for (let r = 0; r < Number(values.requests); r++) {
      const result = await client.infer({ input: sliceItems(input, r % calibrationItems, 1) })
      times.push(result.timing.totalMs)
      bytes = result.timing.requestBytes
    }
    times.sort((a, b) => a - b)
    const option = options.find((o) => o.candidate === p.index && (candidate.kind === 'local' || o.codec === codecName(parseCodec(p.codec))))!
    measured.push({ ...p, bytes, predictedMs: round(predict(option, link, machine, machine).totalMs), measuredMedianMs: round(times[times.length >> 1]!) })
  }
  await client.close()
  links.push({ name, ...link, rows, choices, measured })
}
await server.stop()
await model.release()

console.log(
  JSON.stringify(
    {
      model: values.model,
      cpus: cpus().length,
      loadAverage: { before: round(loadBefore, 2), after: round(loadavg()[0]!, 2) },
      calibrationItems,
      fullMs: round(profile.fullMs),
      cuts,
      links,
    },
    null,
    1,
  ),
)
process.exit(0)
