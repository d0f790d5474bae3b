/**
 * Must-show: every candidate cut of the PP-OCRv4 text detector (330 compute nodes, FPN with Resize/ConvTranspose and
 * skip connections) equals the unsplit model within 1e-5 through the f32 codec, at batch 1 and 8. Inputs are small
 * (3×32×32, the least the detector's stride-32 backbone takes) to keep 331 head/tail pairs fast.
 */
import { afterAll, describe, expect, it } from 'vitest'
import { sliceItems } from '../../../agent/split/profile.ts'
import { SplitModel } from '../../../agent/split/split-model.ts'
import { checkEveryCut, HAVE_OCR, OCR_DET, randomInput } from './split-helpers.ts'

describe.skipIf(!HAVE_OCR)('every cut of the PP-OCRv4 detector', () => {
  let model: SplitModel | undefined
  afterAll(async () => {
    await model?.release()
  })

  it('all cuts equal within 1e-5 on 1×3×32×32 and 8×3×32×32', async () => {
    model = await SplitModel.load(OCR_DET)
    const x = randomInput([8, 3, 32, 32], 11)
    const checks = await checkEveryCut(model, [sliceItems(x, 0, 1), x])
    expect(checks).toHaveLength(model.nodeCount + 1)
    expect(checks.filter((c) => c.crossing.length > 2).length).toBeGreaterThan(10)
    for (const c of checks) expect(c.maxDiff, `cut #${c.index} at ${c.crossing.join(', ')}`).toBeLessThanOrEqual(1e-5)
  }, 1_200_000)
})
