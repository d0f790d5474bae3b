/**
 * Which plan a cluster runs after its membership changed: a worker lost (re-plan over the survivors) or a
 * worker admitted between requests (re-plan over everyone). With a measured profile for every device (the info
 * protocol's `measured`, see peer-info.ts and device-measure.ts) the planner of splitter/cluster-plan.ts picks the
 * fastest predicted plan that gives every device a part; otherwise, or when no such plan fits, TPI-LLM's even
 * tensor-parallel split over the master and the workers.
 */
import { logger } from '@libp2p/logger'
import type { DeviceCapabilities } from '../devices/index.ts'
import {
  buildClusterPlan,
  type ClusterPlan,
  type ClusterPlanChoice,
  type ClusterPlanInput,
  checkClusterPlan,
  type ModelDescription,
  modelCostShape,
  type PlannerLink,
  planClusterChoice,
} from '../splitter/index.ts'
import { availableMemoryBytes, defaultProfileCachePath, readCachedProfile } from './device-measure.ts'
import { probeAgent } from './peer-info.ts'
import type { TransportNode } from '../transport/index.ts'

const log = logger('edgeshard:agent:replan')

/**
 * Link throughput the planner assumes where none was measured, Mbit/s: a wireless-to-wireless Wi-Fi 5 path
 * (devices/profiles.ts, TYPICAL_LINKS.wifi5). Decode allreduces carry a few KiB, so the round trip (measured) matters
 * far more than this.
 */
export const ASSUMED_LINK_MBPS = 250

/** A device a re-plan may use: its index in the cluster and what is known of it. */
export interface ReplanDevice {
  /** Device index (0 = the master, i = worker i). */
  readonly device: number
  /** Its measured capabilities, when it published them (absent: the planner cannot be used). */
  readonly capabilities?: DeviceCapabilities
  /** Bytes it may use for weights and KV cache (the master: its embedding and classifier too). Default: `capabilities.memoryBytes`. */
  readonly budgetBytes?: number
  /** Round trip of a small message from the master, ms (the master itself: 0). Default 1. */
  readonly rttMs?: number
}

/** A re-plan: the plan, whether the planner or the even split made it, and one line saying what or why. */
export interface ReplanChoice {
  readonly plan: ClusterPlan
  readonly by: 'planner' | 'even'
  /** `planner`: its choice and predicted ms/token; `even`: why not the planner (e.g. `worker 2 published no measured profile`). */
  readonly why: string
}

/** Options of {@link replanOver}. */
export interface ReplanOptions {
  /** Device indices the plan is checked against (the master plus every worker the cluster ever had). */
  readonly nDevices: number
  /** Activations of quantized matmuls, kept from the current plan. */
  readonly quantizedMatmul: 'exact' | 'int8'
  /** Plan with the planner when every profile is known (default true); false: always the even split. */
  readonly usePlanner?: boolean
  /** The planner (default `planClusterChoice`); tests replace it. */
  readonly planner?: (input: ClusterPlanInput) => ClusterPlanChoice
}

const name = (device: number): string => (device === 0 ? 'the master' : `worker ${device}`)

/**
 * The plan over `devices` (the master first, then the workers that stay, any order): the planner's fastest plan that
 * gives every one of them a part when all have measured capabilities, else the even tensor-parallel split. Pure.
 * @throws RangeError from the even split (e.g. more devices than KV heads), naming the numbers
 */
export function replanOver(model: ModelDescription, devices: readonly ReplanDevice[], options: ReplanOptions): ReplanChoice {
  if (devices[0]?.device !== 0) throw new RangeError(`cannot re-plan without the master first: got devices ${devices.map((d) => d.device).join(', ')}`)
  const shape = modelCostShape(model)
  const even = (why: string): ReplanChoice => ({
    plan: buildClusterPlan(model.config, [{ devices: devices.map((d) => d.device), layers: model.config.nLayers }], options.nDevices, {
      ffnBlock: shape.ffnBlock,
      attentionBlock: shape.attentionBlock,
      quantizedMatmul: options.quantizedMatmul,
    }),
    by: 'even',
    why,
  })
  if (options.usePlanner === false) return even('the planner is off')
  const unknown = devices.filter((d) => d.capabilities === undefined)
  if (unknown.length > 0) return even(`${unknown.map((d) => name(d.device)).join(', ')} published no measured profile`)
  const input: ClusterPlanInput = {
    model: shape,
    devices: devices.map((d) => {
      const c = d.capabilities!
      return {
        name: name(d.device),
        decodeGBs: c.decodeGBs,
        ...(c.decodeNBitsGBs === undefined ? {} : { decodeNBitsGBs: c.decodeNBitsGBs }),
        ...(c.blockOverheadMs === undefined ? {} : { blockOverheadMs: c.blockOverheadMs }),
        ...(c.messageOverheadMs === undefined ? {} : { messageOverheadMs: c.messageOverheadMs }),
        budgetBytes: d.budgetBytes ?? c.memoryBytes,
      }
    }),
    // Only the master's links were measured (the info probe's round trip); two workers are taken to be as far apart
    // as the farther of them is from the master.
    link: (a, b): PlannerLink => {
      const rtt = (i: number): number => (i === 0 ? 0 : (devices[i]!.rttMs ?? 1))
      return { rttMs: Math.max(rtt(a), rtt(b)), mbps: ASSUMED_LINK_MBPS }
    },
    options: { quantizedMatmul: options.quantizedMatmul },
  }
  let choice: ClusterPlanChoice
  try {
    choice = (options.planner ?? planClusterChoice)(input)
  } catch (err) {
    return even(`the planner found no plan: ${(err as Error).message}`)
  }
  // Every device stays in the cluster: take the fastest plan that gives each of them a part.
  const everyone = choice.alternatives.find((a) => devices.every((_, i) => a.plan.stages.some((s) => s.devices.includes(i)) || i === 0))
  if (!everyone) return even(`no plan of the planner gives all ${devices.length} devices a part`)
  const local = everyone.plan
  const plan: ClusterPlan = {
    ...local,
    stages: local.stages.map((s) => ({ ...s, devices: s.devices.map((i) => devices[i]!.device) })),
    excluded: local.excluded.map((e) => ({ ...e, device: devices[e.device]!.device })),
  }
  try {
    checkClusterPlan(plan, model.config, options.nDevices)
  } catch (err) {
    return even(`the planner's plan does not fit this cluster: ${(err as Error).message}`)
  }
  return { plan, by: 'planner', why: `${everyone.label}, ${everyone.plan.predictedMsPerToken.toFixed(2)} ms/token predicted` }
}

/** What the master knows of one worker for re-planning: its measured capabilities (if published) and round trip. */
export interface WorkerProfile {
  readonly capabilities?: DeviceCapabilities
  readonly rttMs: number
}

/**
 * Asks workers for their device profile over the info protocol (two round trips each, in parallel), before they load
 * a shard (so the memory they report is what a plan may use).
 * @returns by device index; a worker that does not answer within `timeoutMs` is left out
 */
export async function probeWorkerProfiles(
  node: TransportNode,
  workers: readonly { readonly device: number; readonly address: string }[],
  options: { timeoutMs: number; signal?: AbortSignal },
): Promise<Map<number, WorkerProfile>> {
  const signal = options.signal ? AbortSignal.any([options.signal, AbortSignal.timeout(options.timeoutMs)]) : AbortSignal.timeout(options.timeoutMs)
  const out = new Map<number, WorkerProfile>()
  await Promise.all(
    workers.map(async (w) => {
      try {
        const probe = await probeAgent(node, w.address, { signal, rounds: 2 })
        out.set(w.device, { ...(probe.profile.measured ? { capabilities: probe.profile.measured } : {}), rttMs: probe.rttMs })
      } catch (err) {
        log('no profile from worker %d (%s): %s', w.device, w.address, (err as Error).message)
      }
    }),
  )
  return out
}

/**
 * The master's own measured capabilities: this host's cached measurement (`edgeshard profile`, the cache agents
 * publish from), its memory refreshed to what is available now; undefined when this host was never measured.
 */
export function masterCapabilities(cachePath: string = defaultProfileCachePath()): DeviceCapabilities | undefined {
  const cached = readCachedProfile(cachePath)
  return cached ? { ...cached.capabilities, memoryBytes: availableMemoryBytes().availableBytes } : undefined
}
