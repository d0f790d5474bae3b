/**
 * Cluster specs from a survey (agent/link-survey.ts), for the planner: a cluster file's spec with its links and/or
 * device profiles replaced by the measured ones (`emulate --probe-links`, `emulate --profiles measured`), or a spec
 * built from measurements alone for a real cluster without a file (`run` / `serve --plan auto`). Pure.
 */
import { type ClusterDevice, type ClusterLinkPair, type ClusterSpec, DEFAULT_BUDGET_FRACTION, type DeviceCapabilities } from '../devices/index.ts'
import { type ClusterSurvey, surveyedLink } from './link-survey.ts'

/** Which measurements replace a cluster file's figures. */
export interface SurveyUse {
  /** Every pair's link as measured (rtt, Mbit/s) instead of the file's. */
  readonly links: boolean
  /** Every device's published measurement instead of its profile (memory budgets stay the file's). */
  readonly profiles: boolean
}

/**
 * A device's capabilities with the measured figures taken over: memory, cores and the kernels' rates. The per-block
 * and per-message costs of an inline profile are calibrations the measurement does not make: they are kept.
 */
function measuredCapabilities(nominal: DeviceCapabilities | undefined, measured: DeviceCapabilities): DeviceCapabilities {
  return {
    ...measured,
    ...(nominal?.blockOverheadMs === undefined ? {} : { blockOverheadMs: nominal.blockOverheadMs }),
    ...(nominal?.messageOverheadMs === undefined ? {} : { messageOverheadMs: nominal.messageOverheadMs }),
  }
}

/** Every pair of `devices` as a listed link with the survey's measurement. @throws RangeError naming a pair not measured */
function measuredPairs(devices: readonly ClusterDevice[], survey: ClusterSurvey): ClusterLinkPair[] {
  return devices.flatMap((a, i) =>
    devices.slice(i + 1).map((b, k) => {
      const link = surveyedLink(survey, i, i + 1 + k)
      if (!link) throw new RangeError(`the survey did not measure the link ${a.name} ↔ ${b.name}`)
      return { between: [a.name, b.name] as const, link: { rttMs: link.rttMs, mbps: link.mbps } }
    }),
  )
}

/**
 * `spec` with the measurements `use` names taken over (device i of the spec = device i of the survey).
 * @throws RangeError when the survey lacks a device's profile or a pair's link that `use` asks for
 */
export function withSurvey(spec: ClusterSpec, survey: ClusterSurvey, use: SurveyUse): ClusterSpec {
  const devices = use.profiles
    ? spec.devices.map((d, i): ClusterDevice => {
        const measured = survey.profiles[i]
        if (!measured) throw new RangeError(`the survey has no measured profile of device ${i} (${d.name})`)
        return { ...d, profile: 'measured', capabilities: measuredCapabilities(d.capabilities, measured) }
      })
    : spec.devices
  return use.links ? { ...spec, devices, pairs: measuredPairs(devices, survey) } : { ...spec, devices }
}

/**
 * A spec of measurements alone, for a cluster without a file: device i named `names[i]`, with its measured profile,
 * and the budget `budgets[i]` where given, else {@link DEFAULT_BUDGET_FRACTION} of the memory it measured; every
 * link as measured.
 * @param path - what the spec calls itself in messages (e.g. `measured cluster`)
 * @throws RangeError when the survey lacks a device's profile or a pair's link
 */
export function surveyedClusterSpec(
  path: string,
  names: readonly string[],
  budgets: readonly (number | undefined)[],
  survey: ClusterSurvey,
): ClusterSpec {
  const devices = names.map((name, i): ClusterDevice => {
    const measured = survey.profiles[i]
    if (!measured) throw new RangeError(`the survey has no measured profile of device ${i} (${name})`)
    return { name, profile: 'measured', capabilities: measured, memoryBudgetBytes: budgets[i] ?? Math.floor(measured.memoryBytes * DEFAULT_BUDGET_FRACTION) }
  })
  // Every pair is listed; the default covers none (a lone master has no links).
  return { path, devices, defaultLink: { rttMs: 0, mbps: Number.POSITIVE_INFINITY }, pairs: measuredPairs(devices, survey) }
}
