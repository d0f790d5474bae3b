/**
 * The survey `run`, `serve` and `emulate` make before planning (agent/link-survey.ts), with its status lines:
 * `--probe-links` measures every link (master ↔ worker and worker ↔ worker), `--plan auto` outside `emulate` and
 * `emulate --profiles measured` read every device's published measurement.
 */
import type { DeviceCapabilities } from '../../devices/index.ts'
import type { LinkEmulation, TransportNodeOptions } from '../../transport/index.ts'
import { loadOrMeasureProfile } from '../device-measure.ts'
import { type ClusterSurvey, type SurveyProbeOptions, surveyCluster } from '../link-survey.ts'

/** What to survey and how to name things. */
export interface SurveyPlan {
  /** Measure every link. */
  readonly links: boolean
  /** Read every device's measured profile (the master measures or loads its own). */
  readonly profiles: boolean
  /** Device names (0 = master). */
  readonly names: readonly string[]
  /** Emulated links (`emulate`): shaped during the survey and printed beside the measurement. */
  readonly emulated?: (from: number, to: number) => LinkEmulation | undefined
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
  readonly signal?: AbortSignal
}

/** Bytes of each throughput probe: a quarter second at an emulated link's rate (64 KiB … 8 MiB), else 1 MiB. */
export function probePayloadBytes(link: LinkEmulation | undefined): number {
  if (!link) return 2 ** 20
  return Math.round(Math.min(8 * 2 ** 20, Math.max(64 * 2 ** 10, (link.bitsPerSecond * 0.25) / 8)))
}

/**
 * One line per measured device: `device 1 (pi-a) measured: decode 3.1 GB/s f32, 5.2 GB/s 4-bit, prefill 12 GFLOP/s,
 * 0.25 cores, 3.0 GiB free (measured now)`.
 */
export function describeMeasuredDevice(device: number, name: string, c: DeviceCapabilities, cached: boolean): string {
  return (
    `device ${device} (${name}) measured: decode ${c.decodeGBs.toFixed(2)} GB/s f32, ${(c.decodeNBitsGBs ?? c.decodeGBs).toFixed(2)} GB/s 4-bit, ` +
    `prefill ${c.prefillGflops.toFixed(0)} GFLOP/s, ${Number(c.cores.toFixed(3))} cores, ${(c.memoryBytes / 2 ** 30).toFixed(1)} GiB free` +
    `${cached ? ' (cached)' : ' (measured now)'}`
  )
}

/**
 * Surveys the master and the workers at `addresses`: progress lines go to `status`, and a line per device and per link
 * to `report` (`link m → a measured: rtt 20.31 ms (emulated 20), 39.6 Mbit/s (emulated 40)`; without emulation, the
 * measurement alone).
 * @throws as surveyCluster
 */
export async function surveyForPlanning(
  addresses: readonly string[],
  plan: SurveyPlan,
  status: (line: string) => void,
  report: (line: string) => void,
): Promise<ClusterSurvey> {
  const name = (d: number): string => plan.names[d] ?? `device ${d}`
  if (plan.profiles) status(`reading the devices' measured profiles (a device without a cached measurement is measured now, a few seconds each)`)
  if (plan.links && addresses.length > 0) status(`measuring the links between the ${addresses.length + 1} devices over libp2p`)
  return surveyCluster(addresses, {
    ...(plan.signal ? { signal: plan.signal } : {}),
    ...(plan.transport ? { transport: plan.transport } : {}),
    ...(plan.emulated ? { emulated: plan.emulated } : {}),
    probe: plan.links,
    probeOptions: (from, to): SurveyProbeOptions => ({ rounds: 20, payloadRounds: 3, payloadBytes: probePayloadBytes(plan.emulated?.(from, to)) }),
    ...(plan.profiles
      ? {
          profiles: {
            self: async () => {
              const { profile, cached } = await loadOrMeasureProfile()
              report(describeMeasuredDevice(0, name(0), profile.capabilities, cached))
              return profile.capabilities
            },
          },
        }
      : {}),
    onProfile: (device, capabilities, cached) => {
      if (device > 0) report(describeMeasuredDevice(device, name(device), capabilities, cached))
    },
    onLink: ({ from, to, link }) => {
      const set = plan.emulated?.(from, to)
      report(
        set
          ? `link ${name(from)} → ${name(to)} measured: rtt ${link.rttMs.toFixed(2)} ms (emulated ${set.rttMs}), ` +
              `${link.mbps.toFixed(1)} Mbit/s (emulated ${set.bitsPerSecond / 1e6})`
          : `link ${name(from)} → ${name(to)} measured: rtt ${link.rttMs.toFixed(2)} ms, ${link.mbps.toFixed(1)} Mbit/s`,
      )
    },
  })
}
