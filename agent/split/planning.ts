/**
 * Profile-then-plan for split computing: profiles candidate cuts on this device, gets tail times from the server (or
 * this machine when planning offline), measures or takes the link, and runs the pure planner.
 */
import {
  type CutCandidate,
  type DeviceProfile,
  type LinkProfile,
  type Observation,
  planSplit,
  type SplitOption,
  type SplitPlan,
} from '../../splitter/index.ts'
import type { BottleneckCodec } from '../../transport/index.ts'
import type { TypedTensor } from '../runtime.ts'
import type { SplitHeadClient } from './head-client.ts'
import { type AgreementMetric, type ModelProfile, profileCandidates, sliceItems, splitOptions } from './profile.ts'
import type { SplitModel } from './split-model.ts'

/** Candidate cuts profiled by default at most (offload and local always included). */
export const DEFAULT_MAX_CANDIDATES = 48

/** Options of {@link profileAndPlan}. */
export interface ProfileAndPlanOptions {
  /** Calibration inputs (batch along dimension 0). */
  readonly calibration: Readonly<Record<string, TypedTensor>>
  readonly codecs: readonly BottleneckCodec[]
  /** A connected tail server: its tail times and the measured link are used. */
  readonly client?: SplitHeadClient
  /** The link to assume when there is no client (offline planning). */
  readonly link?: LinkProfile
  readonly device?: DeviceProfile
  readonly server?: DeviceProfile
  readonly minAgreement?: number
  /** Profile at most this many cut candidates, the ones with the fewest crossing bytes (default 48). */
  readonly maxCandidates?: number
  readonly repeats?: number
  readonly metric?: AgreementMetric
  readonly onCandidate?: (done: number, total: number) => void
  readonly signal?: AbortSignal
}

/** What {@link profileAndPlan} returns. */
export interface ProfiledPlan {
  readonly profile: ModelProfile
  readonly options: readonly SplitOption[]
  readonly plan: SplitPlan
  readonly link: LinkProfile
  readonly observation: Observation
  /** Whole model on the server, ms per request (when a server was asked). */
  readonly serverFullMs?: number
}

/** The candidates to profile: offload, local, and the `max` cuts with the fewest crossing bytes, in order. */
export function selectCandidates(all: readonly CutCandidate[], max: number): CutCandidate[] {
  const cuts = all.filter((c) => c.kind === 'cut')
  if (cuts.length <= max) return [...all]
  const keep = new Set([...cuts].sort((a, b) => a.bytes - b.bytes || a.index - b.index).slice(0, max).map((c) => c.index))
  return all.filter((c) => c.kind !== 'cut' || keep.has(c.index))
}

/**
 * Profiles `model` on this device, gets server tail times and the link, and plans.
 * @throws RangeError without a link or client; PlanError when nothing is feasible; errors of profiling and transport
 */
export async function profileAndPlan(model: SplitModel, options: ProfileAndPlanOptions): Promise<ProfiledPlan> {
  const { signal } = options
  const sig = signal ? { signal } : {}
  const request = Object.fromEntries(Object.entries(options.calibration).map(([k, v]) => [k, sliceItems(v, 0, 1)]))
  const { observation } = await model.probe(request, sig)
  const chosen = selectCandidates(model.candidates(observation), options.maxCandidates ?? DEFAULT_MAX_CANDIDATES)
  const profile = await profileCandidates(model, {
    calibration: options.calibration,
    codecs: options.codecs,
    candidates: chosen.map((c) => c.index),
    ...(options.repeats === undefined ? {} : { repeats: options.repeats }),
    ...(options.metric ? { metric: options.metric } : {}),
    ...(options.onCandidate ? { onCandidate: options.onCandidate } : {}),
    ...sig,
  })
  let link = options.link
  let serverTailMs: Map<number, number> | undefined
  let serverFullMs: number | undefined
  if (options.client) {
    link = await options.client.measureLink(sig)
    const server = await options.client.profileServer(
      profile.candidates.map((c) => c.candidate),
      request,
      observation,
      { ...(options.repeats === undefined ? {} : { repeats: options.repeats }), ...sig },
    )
    serverTailMs = server.tailMs
    serverFullMs = server.fullMs
  }
  if (!link) throw new RangeError('cannot plan a split without a link: connect to a server or give the link (e.g. 1mbit:20ms)')
  const splitOpts = splitOptions(profile, serverTailMs)
  const plan = planSplit({
    options: splitOpts,
    link,
    ...(options.device ? { device: options.device } : {}),
    ...(options.server ? { server: options.server } : {}),
    ...(options.minAgreement === undefined ? {} : { minAgreement: options.minAgreement }),
  })
  return { profile, options: splitOpts, plan, link, observation, ...(serverFullMs === undefined ? {} : { serverFullMs }) }
}
