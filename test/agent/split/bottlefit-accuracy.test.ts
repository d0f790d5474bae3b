/**
 * Must-show: the BottleFit student cut at its bottleneck [N,4,7,7] with the 8-bit codec keeps top-1 accuracy on
 * Fashion-MNIST test-a within 0.6 points of the unsplit model, at ≤ 25 % of the 784-byte input per image.
 *
 * Bytes are whole payloads (prefix, checksum, descriptors, scales and data). At 8 bits the 196 bottleneck values are
 * exactly 25 % of the input, so a payload fits only when entropy coding earns back its own overhead: with 8 images
 * per request and deflate it does (≈193 bytes/image); one image per request costs 196 + 24 = 220 bytes (28 %).
 */
import { afterAll, describe, expect, it } from 'vitest'
import { feedsFrom, predictions, sliceItems } from '../../../agent/split/profile.ts'
import { SplitModel } from '../../../agent/split/split-model.ts'
import { decodeBottleneck, encodeBottleneck, parseCodec } from '../../../transport/index.ts'
import { BOTTLEFIT, fmnistItems, fmnistLabels, HAVE_FMNIST } from './split-helpers.ts'

const ITEMS = 5000
const INPUT_BYTES = 784

describe.skipIf(!HAVE_FMNIST)('BottleFit student at its bottleneck with the 8-bit codec', () => {
  let model: SplitModel | undefined
  afterAll(async () => {
    await model?.release()
  })

  it('keeps accuracy within 0.6 points on test-a at ≤ 25 % of the input bytes per image', async () => {
    model = await SplitModel.load(BOTTLEFIT)
    const x = fmnistItems(0, ITEMS)
    const labels = fmnistLabels(0, ITEMS)
    const { observation } = await model.probe({ input: sliceItems(x, 0, 1) })
    const cut = model.cut(['bottleneck'], observation)
    expect(cut.crossing).toEqual([{ name: 'bottleneck', type: 'float32', dims: ['N', 4, 7, 7] }])
    const head = await model.session('head', cut.head)
    const tail = await model.session('tail', cut.tail)
    const full = await model.fullSession()
    const codec = parseCodec('q8+deflate')
    const batch = 8
    let fullCorrect = 0
    let splitCorrect = 0
    let bytes = 0
    for (let s = 0; s < ITEMS; s += batch) {
      const feeds = { input: sliceItems(x, s, batch) }
      const want = predictions((await full.run(feeds)).logits!, { kind: 'top1' })
      const b = (await head.run(feeds)).bottleneck!
      const payload = encodeBottleneck([{ type: b.type, dims: b.dims, data: b.data }], codec)
      bytes += payload.byteLength
      const got = predictions((await tail.run(feedsFrom(['bottleneck'], decodeBottleneck(payload)))).logits!, { kind: 'top1' })
      for (let i = 0; i < batch; i++) {
        if (want[i] === labels[s + i]) fullCorrect++
        if (got[i] === labels[s + i]) splitCorrect++
      }
    }
    const fullAccuracy = (100 * fullCorrect) / ITEMS
    const splitAccuracy = (100 * splitCorrect) / ITEMS
    const bytesPerImage = bytes / ITEMS
    process.stderr.write(`bottlefit test-a: unsplit ${fullAccuracy.toFixed(2)} %, bottleneck q8+deflate ${splitAccuracy.toFixed(2)} %, ${bytesPerImage.toFixed(1)} bytes/image\n`)
    expect(fullAccuracy).toBeCloseTo(92.74, 2) // ../shared/models/README.md
    expect(Math.abs(splitAccuracy - fullAccuracy)).toBeLessThanOrEqual(0.6)
    expect(bytesPerImage).toBeLessThanOrEqual(0.25 * INPUT_BYTES)

    // one image per request: the payload is the 196 values plus 24 bytes of prefix, descriptor and scales
    const one = (await head.run({ input: sliceItems(x, 0, 1) })).bottleneck!
    expect(encodeBottleneck([{ type: one.type, dims: one.dims, data: one.data }], parseCodec('q8')).byteLength).toBe(196 + 24)
    await head.release()
    await tail.release()
  }, 300_000)
})
