/**
 * Must-show: for every candidate cut of the Fashion-MNIST teacher and BottleFit student and of the PP-OCR text
 * direction classifier, tail(head(x)) through the f32 codec equals the unsplit model within 1e-5, at batch 1 and 8.
 * (The PP-OCRv4 detector is in cut-equivalence-det.test.ts, so the two files run in parallel.)
 */
import { afterAll, describe, expect, it } from 'vitest'
import { sliceItems } from '../../../agent/split/profile.ts'
import { SplitModel } from '../../../agent/split/split-model.ts'
import { BOTTLEFIT, checkEveryCut, fmnistItems, HAVE_FMNIST, HAVE_OCR, OCR_CLS, randomInput, TEACHER } from './split-helpers.ts'

const models: SplitModel[] = []
afterAll(async () => {
  for (const m of models) await m.release()
})

async function load(path: string): Promise<SplitModel> {
  const m = await SplitModel.load(path)
  models.push(m)
  return m
}

describe.skipIf(!HAVE_FMNIST)('every cut of the Fashion-MNIST models', () => {
  const batch8 = () => fmnistItems(100, 8)

  it('teacher: 23 candidates, residual cuts crossed by two tensors, all equal within 1e-5', async () => {
    const model = await load(TEACHER)
    const x = batch8()
    const checks = await checkEveryCut(model, [sliceItems(x, 0, 1), x])
    expect(checks).toHaveLength(model.nodeCount + 1)
    expect(checks.filter((c) => c.crossing.length === 2).length).toBeGreaterThanOrEqual(6)
    expect(checks.find((c) => c.crossing.includes('stage1_out'))?.crossing).toEqual(['stage1_out'])
    for (const c of checks) expect(c.maxDiff, `cut #${c.index} at ${c.crossing.join(', ')}`).toBeLessThanOrEqual(1e-5)
  })

  it('BottleFit student: the bottleneck [N,4,7,7] is a candidate and all cuts equal within 1e-5', async () => {
    const model = await load(BOTTLEFIT)
    const x = batch8()
    const checks = await checkEveryCut(model, [sliceItems(x, 0, 1), x])
    expect(checks).toHaveLength(model.nodeCount + 1)
    expect(checks.some((c) => c.crossing.length === 1 && c.crossing[0] === 'bottleneck')).toBe(true)
    for (const c of checks) expect(c.maxDiff, `cut #${c.index} at ${c.crossing.join(', ')}`).toBeLessThanOrEqual(1e-5)
  })
})

describe.skipIf(!HAVE_OCR)('every cut of the PP-OCR text direction classifier', () => {
  it('cls (MobileNetV3, weights as Constant nodes): all cuts equal within 1e-5 on 1×3×48×192 and 8×3×48×192', async () => {
    const model = await load(OCR_CLS)
    const x = randomInput([8, 3, 48, 192], 5)
    const checks = await checkEveryCut(model, [sliceItems(x, 0, 1), x])
    expect(checks).toHaveLength(model.nodeCount + 1)
    expect(model.nodeCount).toBeGreaterThan(200)
    for (const c of checks) expect(c.maxDiff, `cut #${c.index} at ${c.crossing.join(', ')}`).toBeLessThanOrEqual(1e-5)
  }, 600_000)
})
