/**
 * The cut cases of the issue run in onnxruntime: a cut inside a residual block (two crossing tensors), a tensor that is
 * also a graph output, an initializer and a Constant read on both sides, cuts around an If whose branches read an
 * outer tensor, a model-local function, and a model with external data — each head and tail loaded from memory.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { sliceItems } from '../../../agent/split/profile.ts'
import { SplitModel } from '../../../agent/split/split-model.ts'
import { decodeModel, toExternalData } from '../../../splitter/index.ts'
import { bytesOf, functionModel, ifModel, residualModel } from '../../splitter/split/onnx-fixtures.ts'
import { checkEveryCut, fmnistItems, HAVE_FMNIST, maxAbsDiff, randomInput, TEACHER } from './split-helpers.ts'

const x8 = randomInput([8, 4], 3)
const batches = [sliceItems(x8, 0, 1), x8]

describe('cuts of small models in onnxruntime', () => {
  it('residual block with a shared weight and a shared Constant: every cut equals the whole model', async () => {
    const model = SplitModel.fromBytes('residual', bytesOf(residualModel()))
    const checks = await checkEveryCut(model, batches)
    expect(checks.map((c) => c.crossing)).toEqual([['x'], ['r'], ['r', 's'], ['r', 'b'], ['c'], ['d'], ['y']])
    for (const c of checks) expect(c.maxDiff).toBeLessThanOrEqual(1e-6)
    await model.release()
  })

  it('a crossing tensor that is also a graph output comes out of the tail unchanged', async () => {
    const model = SplitModel.fromBytes('residual-mid', bytesOf(residualModel({ midOutput: true })))
    const checks = await checkEveryCut(model, batches) // compares both outputs, y and b
    expect(checks[4]!.crossing).toEqual(['b', 'c'])
    for (const c of checks) expect(c.maxDiff).toBeLessThanOrEqual(1e-6)
    await model.release()
  })

  it('If whose branches read an outer tensor: every cut around it equals the whole model; a cut inside is refused', async () => {
    const model = SplitModel.fromBytes('if', bytesOf(ifModel()))
    // both branches are taken: the batch of positive sums and of negative sums
    const pos = { type: 'float32' as const, dims: [2, 4], data: Float32Array.from([1, 2, -0.5, 0.25, 3, -1, 0.5, 0]) }
    const neg = { type: 'float32' as const, dims: [2, 4], data: Float32Array.from([-1, -2, 0.5, -0.25, -3, 1, -0.5, 0]) }
    const checks = await checkEveryCut(model, [pos, neg])
    const ifCut = checks.find((c) => c.crossing.includes('cond') && c.crossing.includes('a'))
    expect(ifCut).toBeDefined()
    for (const c of checks) expect(c.maxDiff).toBeLessThanOrEqual(1e-6)
    expect(() => model.cut(['then_out'])).toThrow(expect.objectContaining({ name: 'ControlFlowCutError' }))
    await model.release()
  })

  it('a model-local function stays whole on one side of every cut', async () => {
    const model = SplitModel.fromBytes('function', bytesOf(functionModel()))
    const checks = await checkEveryCut(model, batches)
    expect(checks.map((c) => c.crossing)).toEqual([['x'], ['a'], ['y']])
    for (const c of checks) expect(c.maxDiff).toBeLessThanOrEqual(1e-6)
    expect(() => model.cut(['t'])).toThrow(expect.objectContaining({ name: 'LocalFunctionCutError' }))
    await model.release()
  })
})

describe.skipIf(!HAVE_FMNIST)('a model with external data', () => {
  const dir = mkdtempSync(join(tmpdir(), 'edgeshard-split-'))
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('loads the external file beside the model, and every cut of it equals the original teacher', async () => {
    const original = readFileSync(TEACHER)
    const { model: bytes, data } = toExternalData(decodeModel(original), 'teacher.weights')
    writeFileSync(join(dir, 'teacher-ext.onnx'), bytes)
    writeFileSync(join(dir, 'teacher.weights'), data)
    expect(bytes.byteLength).toBeLessThan(original.byteLength / 10)
    const model = await SplitModel.load(join(dir, 'teacher-ext.onnx'))
    expect(model.externalData.map((f) => [f.path, f.data.byteLength])).toEqual([['teacher.weights', data.byteLength]])
    const reference = SplitModel.fromBytes('teacher', original)
    const x = fmnistItems(0, 8)
    const want = await (await reference.fullSession()).run({ input: x })
    const got = await (await model.fullSession()).run({ input: x })
    expect(maxAbsDiff(got.logits!.data, want.logits!.data)).toBe(0)
    const checks = await checkEveryCut(model, [sliceItems(x, 0, 1), x])
    for (const c of checks) expect(c.maxDiff).toBeLessThanOrEqual(1e-5)
    // the head at stage1_out holds only its share of the external weights
    const { observation } = await model.probe({ input: sliceItems(x, 0, 1) })
    const cut = model.cut(['stage1_out'], observation)
    expect(cut.headBytes).toBeGreaterThan(cut.head.byteLength)
    expect(cut.headBytes).toBeLessThan(data.byteLength / 2)
    await model.release()
    await reference.release()
  })

  it('names a missing external-data file', async () => {
    const { model: bytes } = toExternalData(decodeModel(readFileSync(TEACHER)), 'gone.weights')
    writeFileSync(join(dir, 'orphan.onnx'), bytes)
    await expect(SplitModel.load(join(dir, 'orphan.onnx'))).rejects.toMatchObject({ name: 'ModelFormatError', message: expect.stringMatching(/cannot read external data .*gone\.weights/) })
  })
})
