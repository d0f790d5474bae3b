/**
 * Profiling candidate cuts with real onnxruntime runs on this machine (Neurosurgeon §4.2 profiles layers; here whole
 * heads and tails are timed, so fused kernels and per-run overheads are counted as they will run):
 * head and tail time per request, encode/decode time and payload bytes per codec, and top-1 agreement with the unsplit
 * model on calibration inputs per quantization (compression is lossless, so agreement depends on quantization only).
 */
import { logger } from '@libp2p/logger'
import type { CutCandidate, SplitOption } from '../../splitter/index.ts'
import {
  type BottleneckCodec,
  type CodecQuantization,
  codecName,
  decodeBottleneck,
  encodeBottleneck,
} from '../../transport/index.ts'
import type { TypedSession, TypedTensor } from '../runtime.ts'
import type { SplitModel } from './split-model.ts'

const log = logger('edgeshard:split')

/** How predictions of two runs are compared for agreement. */
export type AgreementMetric =
  /** Same argmax along axis 1 (classes), per item and trailing position. */
  | { readonly kind: 'top1' }
  /** Same side of `threshold` per element (segmentation maps, e.g. PP-OCR det probabilities at 0.3). */
  | { readonly kind: 'threshold'; readonly threshold: number }

/** Options of {@link profileCandidates}. */
export interface ProfileOptions {
  /** Calibration inputs (batch ≥ 1 along dimension 0): agreement is measured on all of them. */
  readonly calibration: Readonly<Record<string, TypedTensor>>
  /** Codecs to try on each cut (offload included). */
  readonly codecs: readonly BottleneckCodec[]
  /** Items per request for timing and bytes (default 1: the first calibration items). */
  readonly requestItems?: number
  /** Timed repetitions per measurement; the median is kept (default 9). */
  readonly repeats?: number
  /** Profile only these candidate indices (default: all; offload and local are always kept). */
  readonly candidates?: readonly number[]
  /** Agreement metric (default: top1 when the first output has more than one value along axis 1, else threshold 0.5). */
  readonly metric?: AgreementMetric
  /** Items per calibration batch (default 64). */
  readonly calibrationBatch?: number
  /** Reports each candidate when profiled. */
  readonly onCandidate?: (done: number, total: number) => void
  readonly signal?: AbortSignal
}

/** Profile of one codec at one cut. */
export interface CodecProfile {
  readonly codec: string
  /** Payload bytes of one request (mean over the first calibration requests, up to 8). */
  readonly bytes: number
  readonly encodeMs: number
  readonly decodeMs: number
  readonly agreement: number
}

/** Profile of one candidate cut measured on this machine. */
export interface CandidateProfile {
  readonly candidate: CutCandidate
  /** Head time per request (the whole model for local-only), ms. */
  readonly headMs: number
  /** Tail time per request on this machine, ms (servers measure their own). */
  readonly tailMs: number
  /** Reply bytes (outputs in f32) per request. */
  readonly replyBytes: number
  /** Model bytes the device holds for this candidate (head ONNX + its external data; the whole model for local). */
  readonly deviceBytes: number
  readonly codecs: readonly CodecProfile[]
}

/** The profile {@link profileCandidates} returns. */
export interface ModelProfile {
  readonly model: string
  readonly requestItems: number
  readonly calibrationItems: number
  /** The whole model per request on this machine, ms. */
  readonly fullMs: number
  readonly candidates: readonly CandidateProfile[]
}

/** Requests whose payloads are averaged for the bytes of each codec. */
const BYTE_SAMPLES = 8

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b)
  return s.length === 0 ? 0 : s[(s.length - 1) >> 1]!
}

/** Median time of `repeats` calls of `fn` after two warm-up calls, ms. */
export async function timeRuns(repeats: number, fn: () => Promise<unknown> | unknown): Promise<number> {
  await fn()
  await fn()
  const times: number[] = []
  for (let i = 0; i < repeats; i++) {
    const t0 = performance.now()
    await fn()
    times.push(performance.now() - t0)
  }
  return median(times)
}

/** Items `[start, start + count)` of a batched tensor (dimension 0), a view without copy. */
export function sliceItems(t: TypedTensor, start: number, count: number): TypedTensor {
  const per = t.dims.slice(1).reduce((a, b) => a * b, 1)
  return { type: t.type, dims: [count, ...t.dims.slice(1)], data: t.data.subarray(start * per, (start + count) * per) as TypedTensor['data'] }
}

function sliceFeeds(feeds: Readonly<Record<string, TypedTensor>>, start: number, count: number): Record<string, TypedTensor> {
  return Object.fromEntries(Object.entries(feeds).map(([k, v]) => [k, sliceItems(v, start, count)]))
}

function batchOf(feeds: Readonly<Record<string, TypedTensor>>): number {
  const first = Object.values(feeds)[0]
  if (!first) throw new RangeError('cannot profile: no calibration inputs')
  return first.dims[0] ?? 1
}

/** Per item (and trailing position) predictions of an output under `metric`, for comparison. */
export function predictions(output: TypedTensor, metric: AgreementMetric): Int32Array {
  const data = output.data as Float32Array
  if (metric.kind === 'threshold') return Int32Array.from(data, (v) => (v > metric.threshold ? 1 : 0))
  const [n = 1, c = 1] = output.dims
  const inner = output.dims.slice(2).reduce((a, b) => a * b, 1)
  const out = new Int32Array(n * inner)
  for (let i = 0; i < n; i++) {
    for (let p = 0; p < inner; p++) {
      let best = 0
      for (let k = 1; k < c; k++) if (data[(i * c + k) * inner + p]! > data[(i * c + best) * inner + p]!) best = k
      out[i * inner + p] = best
    }
  }
  return out
}

/** The default agreement metric of a model: top-1 for class outputs, else a 0.5 threshold. */
export function defaultMetric(model: SplitModel): AgreementMetric {
  const c = model.outputs[0]?.dims[1]
  return typeof c === 'number' && c > 1 ? { kind: 'top1' } : { kind: 'threshold', threshold: 0.5 }
}

function toCodecTensors(model: SplitModel, names: readonly string[], values: Readonly<Record<string, TypedTensor>>) {
  return names.map((name) => {
    const t = values[name]
    if (!t) throw new RangeError(`cannot encode crossing tensor ${name} of ${model.path}: the head did not produce it`)
    return { type: t.type, dims: t.dims, data: t.data }
  })
}

/** Tail feeds from decoded tensors, in crossing order. */
export function feedsFrom(names: readonly string[], decoded: readonly { type: TypedTensor['type']; dims: readonly number[]; data: TypedTensor['data'] }[]): Record<string, TypedTensor> {
  return Object.fromEntries(names.map((name, i) => [name, { type: decoded[i]!.type, dims: decoded[i]!.dims, data: decoded[i]!.data }]))
}

/**
 * Profiles candidate cuts of `model` on this machine with real runs: head and tail times per request, bytes and
 * encode/decode times per codec, agreement with the unsplit model per quantization on the calibration inputs.
 * @throws RangeError without calibration inputs; CutError for an invalid cut; RuntimeError from onnxruntime
 */
export async function profileCandidates(model: SplitModel, options: ProfileOptions): Promise<ModelProfile> {
  const { signal } = options
  const repeats = options.repeats ?? 9
  const total = batchOf(options.calibration)
  const requestItems = Math.min(options.requestItems ?? 1, total)
  const metric = options.metric ?? defaultMetric(model)
  const calibrationBatch = options.calibrationBatch ?? 64
  const request = sliceFeeds(options.calibration, 0, requestItems)
  const outputName = model.outputs[0]!.name

  const full = await model.fullSession()
  const fullMs = await timeRuns(repeats, () => full.run(request, signal ? { signal } : {}))
  // reference predictions of the unsplit model, and an observation at the request size
  const reference: Int32Array[] = []
  for (let s = 0; s < total; s += calibrationBatch) {
    const y = await full.run(sliceFeeds(options.calibration, s, Math.min(calibrationBatch, total - s)), signal ? { signal } : {})
    reference.push(predictions(y[outputName]!, metric))
  }
  const { observation, values: requestValues } = await model.probe(request, signal ? { signal } : {})
  const outputs = await full.run(request)
  const replyBytes = encodeBottleneck(
    model.outputs.map((o) => ({ type: outputs[o.name]!.type, dims: outputs[o.name]!.dims, data: outputs[o.name]!.data })),
    { quantization: 'f32', compression: 'none' },
  ).byteLength

  const all = model.candidates(observation)
  const wanted = options.candidates ? new Set(options.candidates) : undefined
  const chosen = all.filter((c) => !wanted || wanted.has(c.index) || c.kind !== 'cut')
  const profiles: CandidateProfile[] = []
  for (const [done, candidate] of chosen.entries()) {
    signal?.throwIfAborted()
    profiles.push(await profileOne(model, candidate, { ...options, repeats, metric, calibrationBatch, total, request, requestValues, reference, replyBytes, observation }))
    options.onCandidate?.(done + 1, chosen.length)
  }
  log('profiled %d candidates of %s', profiles.length, model.path)
  return { model: model.path, requestItems, calibrationItems: total, fullMs, candidates: profiles }
}

interface ProfileContext extends ProfileOptions {
  readonly repeats: number
  readonly metric: AgreementMetric
  readonly calibrationBatch: number
  readonly total: number
  readonly request: Record<string, TypedTensor>
  readonly requestValues: Readonly<Record<string, TypedTensor>>
  readonly reference: readonly Int32Array[]
  readonly replyBytes: number
  readonly observation: Parameters<SplitModel['cut']>[1]
}

async function profileOne(model: SplitModel, candidate: CutCandidate, ctx: ProfileContext): Promise<CandidateProfile> {
  const signal = ctx.signal
  const runOpts = signal ? { signal } : {}
  const outputName = model.outputs[0]!.name
  if (candidate.kind === 'local') {
    const full = await model.fullSession()
    const headMs = await timeRuns(ctx.repeats, () => full.run(ctx.request, runOpts))
    const deviceBytes = model.bytes.byteLength + model.externalData.reduce((n, f) => n + f.data.byteLength, 0)
    return { candidate, headMs, tailMs: 0, replyBytes: 0, deviceBytes, codecs: [] }
  }
  const cut = model.cut(candidate.crossing, ctx.observation)
  const head: TypedSession = await model.session(`head@${candidate.index}`, cut.head)
  const tail: TypedSession = await model.session(`tail@${candidate.index}`, cut.tail)
  try {
    const headFeeds = Object.fromEntries(cut.headInputs.map((n) => [n, ctx.request[n]!]))
    const headMs = cut.headNodes === 0 ? 0 : await timeRuns(ctx.repeats, () => head.run(headFeeds, runOpts))
    const crossingValues = Object.fromEntries(candidate.crossing.map((n) => [n, ctx.requestValues[n]!]))
    const tailMs = await timeRuns(ctx.repeats, () => tail.run(crossingValues, runOpts))
    const requestTensors = toCodecTensors(model, candidate.crossing, ctx.requestValues)

    // agreement per quantization over the calibration set
    const quantizations = [...new Set(ctx.codecs.map((c) => c.quantization))]
    const agree = new Map<CodecQuantization, number>(quantizations.map((q) => [q, 0]))
    let items = 0
    for (let s = 0, b = 0; s < ctx.total; s += ctx.calibrationBatch, b++) {
      const count = Math.min(ctx.calibrationBatch, ctx.total - s)
      const feeds = sliceFeeds(ctx.calibration, s, count)
      const headOut = await head.run(Object.fromEntries(cut.headInputs.map((n) => [n, feeds[n]!])), runOpts)
      const values = { ...feeds, ...headOut }
      const tensors = toCodecTensors(model, candidate.crossing, values)
      const ref = ctx.reference[b]!
      for (const q of quantizations) {
        const decoded = decodeBottleneck(encodeBottleneck(tensors, { quantization: q, compression: 'none' }))
        const y = await tail.run(feedsFrom(candidate.crossing, decoded), runOpts)
        const pred = predictions(y[outputName]!, ctx.metric)
        let same = 0
        for (let i = 0; i < pred.length; i++) if (pred[i] === ref[i]) same++
        agree.set(q, agree.get(q)! + same)
      }
      items += ref.length
    }

    // payload bytes: mean over the first requests of the calibration set (compression depends on the content)
    const requestItems = Object.values(ctx.request)[0]?.dims[0] ?? 1
    const samples = Math.max(1, Math.min(BYTE_SAMPLES, Math.floor(ctx.total / requestItems)))
    const sampleTensors = [requestTensors]
    for (let k = 1; k < samples; k++) {
      const feeds = sliceFeeds(ctx.calibration, k * requestItems, requestItems)
      const out = cut.headNodes === 0 ? {} : await head.run(Object.fromEntries(cut.headInputs.map((n) => [n, feeds[n]!])), runOpts)
      sampleTensors.push(toCodecTensors(model, candidate.crossing, { ...feeds, ...out }))
    }
    const codecs: CodecProfile[] = []
    const codecRepeats = Math.max(3, Math.ceil(ctx.repeats / 3))
    for (const codec of ctx.codecs) {
      let payload: Uint8Array = new Uint8Array(0)
      const encodeMs = await timeRuns(codecRepeats, () => {
        payload = encodeBottleneck(requestTensors, codec)
      })
      const decodeMs = await timeRuns(codecRepeats, () => decodeBottleneck(payload))
      const bytes = sampleTensors.reduce((sum, t) => sum + encodeBottleneck(t, codec).byteLength, 0) / sampleTensors.length
      codecs.push({ codec: codecName(codec), bytes, encodeMs, decodeMs, agreement: agree.get(codec.quantization)! / items })
    }
    return { candidate, headMs, tailMs, replyBytes: ctx.replyBytes, deviceBytes: cut.headBytes, codecs }
  } finally {
    await head.release()
    await tail.release()
  }
}

/** A short label of a candidate: its crossing tensors (at most two named) or local/offload. */
export function candidateLabel(c: CutCandidate): string {
  if (c.kind === 'local') return 'local'
  const names = c.crossing.length <= 2 ? c.crossing.join('+') : `${c.crossing.slice(0, 2).join('+')}+${c.crossing.length - 2} more`
  return c.kind === 'offload' ? `offload(${names})` : names
}

/**
 * Planner options from a device profile, with tail times from `serverTailMs` (by candidate index, as the server
 * measured them; default the local measurement).
 */
export function splitOptions(profile: ModelProfile, serverTailMs?: ReadonlyMap<number, number>): SplitOption[] {
  const options: SplitOption[] = []
  for (const p of profile.candidates) {
    const label = candidateLabel(p.candidate)
    if (p.candidate.kind === 'local') {
      options.push({ candidate: p.candidate.index, kind: 'local', label, codec: '-', headMs: p.headMs, encodeMs: 0, bytes: 0, replyBytes: 0, decodeMs: 0, tailMs: 0, agreement: 1, deviceBytes: p.deviceBytes })
      continue
    }
    const tailMs = serverTailMs?.get(p.candidate.index) ?? p.tailMs
    for (const c of p.codecs) {
      options.push({
        candidate: p.candidate.index,
        kind: p.candidate.kind,
        label,
        codec: c.codec,
        headMs: p.headMs,
        encodeMs: c.encodeMs,
        bytes: c.bytes,
        replyBytes: p.replyBytes,
        decodeMs: c.decodeMs,
        tailMs,
        agreement: c.agreement,
        deviceBytes: p.deviceBytes,
      })
    }
  }
  return options
}
