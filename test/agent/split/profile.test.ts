/** Profiling candidate cuts with real runs, reading input files, and choosing which candidates to profile. */
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { readInputFile } from '../../../agent/split/inputs.ts'
import { selectCandidates } from '../../../agent/split/planning.ts'
import { predictions, profileCandidates, sliceItems, splitOptions } from '../../../agent/split/profile.ts'
import { SplitModel } from '../../../agent/split/split-model.ts'
import { parseCodec } from '../../../transport/index.ts'
import { BOTTLEFIT, FMNIST_MEAN, FMNIST_STD, fmnistItems, HAVE_FMNIST, TEST_A } from './split-helpers.ts'

describe.skipIf(!HAVE_FMNIST)('profileCandidates on the BottleFit student', () => {
  let model: SplitModel | undefined
  afterAll(async () => {
    await model?.release()
  })

  it('measures bytes per codec exactly, agreement per quantization, and keeps offload and local', async () => {
    model = await SplitModel.load(BOTTLEFIT)
    const calibration = { input: fmnistItems(0, 96) }
    const { observation } = await model.probe({ input: sliceItems(calibration.input, 0, 1) })
    const bottleneck = model.candidates(observation).find((c) => c.crossing[0] === 'bottleneck')!
    const profile = await profileCandidates(model, {
      calibration,
      codecs: ['f32', 'q8', 'q8+deflate', 'q4'].map(parseCodec),
      candidates: [bottleneck.index],
      repeats: 3,
      calibrationBatch: 40,
    })
    expect(profile.calibrationItems).toBe(96)
    expect(profile.candidates.map((c) => c.candidate.kind)).toEqual(['offload', 'cut', 'local'])
    const [offload, cut, local] = profile.candidates
    expect(offload!.codecs.map((c) => [c.codec, c.bytes, c.agreement])).toEqual([
      ['f32', 8 + 8 + 3136, 1],
      ['q8', 8 + 8 + 8 + 784, 1],
      ['q8+deflate', expect.any(Number), 1],
      ['q4', 8 + 8 + 8 + 392, expect.any(Number)],
    ])
    expect(cut!.codecs.map((c) => c.bytes)).toEqual([800, 220, expect.any(Number), 122])
    expect(cut!.codecs[0]!.agreement).toBe(1)
    expect(cut!.codecs[1]!.agreement).toBeGreaterThanOrEqual(0.98)
    expect(cut!.replyBytes).toBe(8 + 6 + 40) // logits [1,10] f32: prefix, descriptor, data
    expect(cut!.deviceBytes).toBeLessThan(local!.deviceBytes / 5)
    expect(local!.deviceBytes).toBe(statSync(BOTTLEFIT).size)
    for (const c of profile.candidates) expect(c.headMs).toBeGreaterThanOrEqual(0)
    const options = splitOptions(profile, new Map([[bottleneck.index, 123]]))
    expect(options).toHaveLength(4 + 4 + 1)
    expect(options.filter((o) => o.candidate === bottleneck.index).every((o) => o.tailMs === 123)).toBe(true)
    expect(options.at(-1)).toMatchObject({ kind: 'local', codec: '-', bytes: 0, agreement: 1 })
  }, 120_000)
})

describe('helpers', () => {
  it('predictions: argmax along axis 1 per item and position, or a threshold', () => {
    const logits = { type: 'float32' as const, dims: [2, 3], data: Float32Array.from([0, 2, 1, 5, -1, 4]) }
    expect(Array.from(predictions(logits, { kind: 'top1' }))).toEqual([1, 0])
    const map = { type: 'float32' as const, dims: [1, 2, 2], data: Float32Array.from([0.1, 0.9, 0.4, 0.2]) }
    expect(Array.from(predictions(map, { kind: 'top1' }))).toEqual([1, 0])
    expect(Array.from(predictions(map, { kind: 'threshold', threshold: 0.3 }))).toEqual([0, 1, 1, 0])
  })

  it('selectCandidates keeps offload, local and the cuts with the fewest bytes, in order', () => {
    const c = (index: number, kind: 'offload' | 'cut' | 'local', bytes: number) => ({ index, kind, after: null, afterOp: null, crossing: [`t${index}`], bytes, bytesPerItem: bytes })
    const all = [c(0, 'offload', 50), c(1, 'cut', 400), c(2, 'cut', 100), c(3, 'cut', 300), c(4, 'cut', 100), c(5, 'local', 40)]
    expect(selectCandidates(all, 2).map((x) => x.index)).toEqual([0, 2, 4, 5])
    expect(selectCandidates(all, 10)).toHaveLength(6)
  })
})

describe.skipIf(!HAVE_FMNIST)('readInputFile', () => {
  const dir = mkdtempSync(join(tmpdir(), 'edgeshard-inputs-'))
  afterAll(() => rmSync(dir, { recursive: true, force: true }))
  const spec = { name: 'input', type: 'float32' as const, dims: ['N', 1, 28, 28] }

  it('normalises u8 pixels like the model was trained, and reads f32 files as they are', async () => {
    const x = await readInputFile(TEST_A, spec, { mean: [FMNIST_MEAN], std: [FMNIST_STD], offset: 3, count: 2 })
    expect(x.dims).toEqual([2, 1, 28, 28])
    expect(x.data).toEqual(fmnistItems(3, 2).data)
    const f32 = join(dir, 'x.f32')
    writeFileSync(f32, fmnistItems(0, 3).data as Float32Array)
    expect((await readInputFile(f32, spec, { type: 'f32', offset: 1 })).data).toEqual(fmnistItems(1, 2).data)
  })

  it('names a file that is not a whole number of items, a range past its end, and dynamic dims without --shape', async () => {
    const odd = join(dir, 'odd.bin')
    writeFileSync(odd, new Uint8Array(1000))
    await expect(readInputFile(odd, spec)).rejects.toMatchObject({ name: 'UsageError', message: expect.stringMatching(/1000 bytes, not a whole number of u8 items of \[1, 28, 28\]/) })
    await expect(readInputFile(TEST_A, spec, { offset: 4999, count: 2 })).rejects.toThrow(/holds 5000 items; cannot read 2 from item 4999/)
    await expect(readInputFile(TEST_A, { ...spec, dims: ['N', 3, 'H', 'W'] })).rejects.toThrow(/dynamic dims \[N, 3, H, W\]: pass --shape/)
  })
})
