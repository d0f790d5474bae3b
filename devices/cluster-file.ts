/**
 * Cluster files: the devices of a (real or emulated) cluster and the links between them, as JSON. Read by
 * `edgeshard plan` and `edgeshard emulate`. Format (README, "Cluster files"):
 *
 * ```json
 * { "devices": [ { "name": "laptop", "profile": "laptop", "cpu": 1, "memoryBudget": "2GiB" },
 *                { "name": "pi-a", "profile": "raspberry-pi-4b", "cpu": 0.25 },
 *                { "name": "x", "profile": { "memoryBytes": 2e9, "cores": 4, "decodeGBs": 4,
 *                                            "prefillGflops": 20, "diskReadMBs": 80 } } ],
 *   "links": { "default": { "rttMs": 1, "mbps": 1000 },
 *              "pairs": [ { "between": ["laptop", "pi-a"], "rttMs": 10, "mbps": 100 },
 *                         { "between": ["pi-a", "x"], "link": "wifi5" } ] } }
 * ```
 *
 * `devices[0]` is the master (holds the prompt, the embedding and the classifier). `profile` is a known profile name
 * (profiles.ts) or inline capabilities. `memoryBudget` (bytes as a number or `"512MB"`, `"2GiB"`) defaults to
 * {@link DEFAULT_BUDGET_FRACTION} of the profile's memory. `cpu` is the share of one host core the emulator gives the
 * agent (emulation only). A link is `{ rttMs, mbps }` or `{ link: "gbe" | "wifi5" | "wifi6" }` (typical links);
 * `links.default` applies to every pair not listed (default: the typical `gbe` link). Links are symmetric.
 */
import { readFileSync } from 'node:fs'
import { type DeviceCapabilities, describeValue, type LinkCapabilities, parseCapabilities, parseLink } from './capabilities.ts'
import { ClusterFileError } from './errors.ts'
import { DEVICE_PROFILE_NAMES, knownDeviceProfile, type LinkKind, TYPICAL_LINKS } from './profiles.ts'

/**
 * Default memory budget as a fraction of the profile's memory: the rest is left to the OS, Node and onnxruntime
 * (an estimate; set `memoryBudget` per device for a real cluster).
 */
export const DEFAULT_BUDGET_FRACTION = 0.75

/** One device of a cluster file, resolved. */
export interface ClusterDevice {
  /** Unique name (letters, digits, `.`, `_`, `-`). */
  readonly name: string
  /** The known profile it names, or `inline`. */
  readonly profile: string
  readonly capabilities: DeviceCapabilities
  /** Bytes the planner may give this device for weights, KV cache (and, on the master, the embedding and classifier). */
  readonly memoryBudgetBytes: number
  /** Share of one host core the emulator gives this agent (e.g. 0.25); absent: unconstrained. */
  readonly cpu?: number
}

/** A link between two named devices. */
export interface ClusterLinkPair {
  readonly between: readonly [string, string]
  readonly link: LinkCapabilities
}

/** A parsed cluster file: plain data (serialisable), devices in file order (index 0 = master). */
export interface ClusterSpec {
  /** The file it came from (or the label given to {@link parseClusterFile}). */
  readonly path: string
  readonly devices: readonly ClusterDevice[]
  /** Link of every pair not listed in `pairs`. */
  readonly defaultLink: LinkCapabilities
  readonly pairs: readonly ClusterLinkPair[]
}

const NAME = /^[A-Za-z0-9._-]{1,64}$/
const BYTE_UNITS: Readonly<Record<string, number>> = { '': 1, K: 1e3, M: 1e6, G: 1e9, T: 1e12, Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40 }

/** Parses `512MB`, `2GiB`, `300000000` (K/M/G/T decimal, Ki/Mi/Gi/Ti binary, `B` optional) into bytes; undefined if not a size. */
export function parseByteSize(value: string): number | undefined {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?)?B?\s*$/.exec(value)
  const scale = match ? BYTE_UNITS[(match[2] ?? '').replace('k', 'K')] : undefined
  return match && scale !== undefined ? Math.floor(Number(match[1]) * scale) : undefined
}

/**
 * Reads and checks a cluster file.
 * @throws ClusterFileError naming the file, the JSON path and what was expected (also when unreadable or not JSON)
 */
export function readClusterFile(path: string): ClusterSpec {
  let text: string
  try {
    text = readFileSync(path, 'utf8')
  } catch (err) {
    throw new ClusterFileError(path, '$', `cannot open: ${(err as Error).message}`, { cause: err })
  }
  return parseClusterFile(text, path)
}

/**
 * Parses and checks cluster-file JSON (see the module comment for the format).
 * @param path - named in errors and kept in the result
 * @throws ClusterFileError naming `path`, the JSON path (e.g. `devices[1].profile`) and what was expected
 */
export function parseClusterFile(text: string, path: string): ClusterSpec {
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch (err) {
    throw new ClusterFileError(path, '$', `not JSON: ${(err as Error).message}`, { cause: err })
  }
  const fail = (jsonPath: string, detail: string): never => {
    throw new ClusterFileError(path, jsonPath, detail)
  }
  const root = object(doc, '$', fail, ['devices', 'links'])
  if (!Array.isArray(root.devices) || root.devices.length === 0) {
    fail('devices', `expected a non-empty array of devices (the first is the master), got ${describeValue(root.devices)}`)
  }
  const devices = (root.devices as unknown[]).map((d, i) => parseDevice(d, `devices[${i}]`, fail))
  const seen = new Map<string, number>()
  devices.forEach((d, i) => {
    const first = seen.get(d.name)
    if (first !== undefined) fail(`devices[${i}].name`, `expected a unique name, got "${d.name}" (also devices[${first}])`)
    seen.set(d.name, i)
  })

  let defaultLink: LinkCapabilities = TYPICAL_LINKS.gbe
  const pairs: ClusterLinkPair[] = []
  if (root.links !== undefined) {
    const links = object(root.links, 'links', fail, ['default', 'pairs'])
    if (links.default !== undefined) defaultLink = parseLinkSpec(links.default, 'links.default', fail, [])
    if (links.pairs !== undefined) {
      if (!Array.isArray(links.pairs)) fail('links.pairs', `expected an array, got ${describeValue(links.pairs)}`)
      const keys = new Set<string>()
      for (const [i, p] of (links.pairs as unknown[]).entries()) {
        const where = `links.pairs[${i}]`
        const pair = object(p, where, fail, ['between', 'rttMs', 'mbps', 'link'])
        const between = pair.between
        if (!Array.isArray(between) || between.length !== 2 || between.some((n) => typeof n !== 'string')) {
          fail(`${where}.between`, `expected two device names, got ${describeValue(between)}`)
        }
        const [a, b] = between as [string, string]
        for (const [j, n] of [a, b].entries()) {
          if (!seen.has(n)) fail(`${where}.between[${j}]`, `expected a device name (${[...seen.keys()].join(', ')}), got "${n}"`)
        }
        if (a === b) fail(`${where}.between`, `expected two different devices, got "${a}" twice`)
        const key = [a, b].sort().join('\u0000')
        if (keys.has(key)) fail(`${where}.between`, `expected each pair once, got ${a}–${b} again`)
        keys.add(key)
        pairs.push({ between: [a, b], link: parseLinkSpec(pair, where, fail, ['between']) })
      }
    }
  }
  return { path, devices, defaultLink, pairs }
}

/**
 * The link between devices `a` and `b` of `cluster` (index or name; symmetric): the listed pair, else the default.
 * A device to itself: `{ rttMs: 0, mbps: Infinity }`.
 * @throws RangeError when a device is not in the cluster
 */
export function clusterLink(cluster: ClusterSpec, a: number | string, b: number | string): LinkCapabilities {
  const nameOf = (d: number | string): string => {
    const name = typeof d === 'number' ? cluster.devices[d]?.name : cluster.devices.find((x) => x.name === d)?.name
    if (name === undefined) throw new RangeError(`no device ${JSON.stringify(d)} in cluster ${cluster.path} (${cluster.devices.map((x) => x.name).join(', ')})`)
    return name
  }
  const na = nameOf(a)
  const nb = nameOf(b)
  if (na === nb) return { rttMs: 0, mbps: Number.POSITIVE_INFINITY }
  const pair = cluster.pairs.find((p) => (p.between[0] === na && p.between[1] === nb) || (p.between[0] === nb && p.between[1] === na))
  return pair?.link ?? cluster.defaultLink
}

type Fail = (jsonPath: string, detail: string) => never

function object(value: unknown, where: string, fail: Fail, keys: readonly string[]): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(where, `expected an object, got ${describeValue(value)}`)
  const v = value as Record<string, unknown>
  for (const key of Object.keys(v)) {
    if (!keys.includes(key)) fail(`${where === '$' ? '' : `${where}.`}${key}`, `unknown field (expected ${keys.join(', ')})`)
  }
  return v
}

function parseDevice(value: unknown, where: string, fail: Fail): ClusterDevice {
  const d = object(value, where, fail, ['name', 'profile', 'cpu', 'memoryBudget'])
  if (typeof d.name !== 'string' || !NAME.test(d.name)) {
    fail(`${where}.name`, `expected a name of 1–64 letters, digits, '.', '_' or '-', got ${describeValue(d.name)}`)
  }
  let capabilities: DeviceCapabilities
  let profile: string
  if (typeof d.profile === 'string') {
    const known = knownDeviceProfile(d.profile)
    if (!known) fail(`${where}.profile`, `expected a known profile (${DEVICE_PROFILE_NAMES.join(', ')}) or an object, got "${d.profile}"`)
    capabilities = known!.capabilities
    profile = d.profile
  } else {
    capabilities = parseCapabilities(d.profile, (field, detail) => fail(`${where}.profile${field === '' ? '' : `.${field}`}`, detail))
    profile = 'inline'
  }
  let memoryBudgetBytes = Math.floor(capabilities.memoryBytes * DEFAULT_BUDGET_FRACTION)
  if (d.memoryBudget !== undefined) {
    const bytes =
      typeof d.memoryBudget === 'number' ? d.memoryBudget : typeof d.memoryBudget === 'string' ? parseByteSize(d.memoryBudget) : undefined
    if (bytes === undefined || !Number.isFinite(bytes) || bytes <= 0) {
      fail(`${where}.memoryBudget`, `expected bytes > 0 (a number or a size like "512MB", "2GiB"), got ${describeValue(d.memoryBudget)}`)
    }
    memoryBudgetBytes = Math.floor(bytes!)
  }
  if (d.cpu !== undefined && (typeof d.cpu !== 'number' || !Number.isFinite(d.cpu) || d.cpu <= 0 || d.cpu > 1024)) {
    fail(`${where}.cpu`, `expected a share of host cores > 0 (e.g. 0.25, 1, 2), got ${describeValue(d.cpu)}`)
  }
  return {
    name: d.name as string,
    profile,
    capabilities,
    memoryBudgetBytes,
    ...(d.cpu === undefined ? {} : { cpu: d.cpu as number }),
  }
}

function parseLinkSpec(value: unknown, where: string, fail: Fail, extraKeys: readonly string[]): LinkCapabilities {
  const v = object(value, where, fail, [...extraKeys, 'rttMs', 'mbps', 'link'])
  if (v.link !== undefined) {
    if (v.rttMs !== undefined || v.mbps !== undefined) fail(`${where}.link`, 'expected either "link" or "rttMs" and "mbps", got both')
    if (typeof v.link !== 'string' || !Object.hasOwn(TYPICAL_LINKS, v.link)) {
      fail(`${where}.link`, `expected a typical link (${Object.keys(TYPICAL_LINKS).join(', ')}), got ${describeValue(v.link)}`)
    }
    return TYPICAL_LINKS[v.link as LinkKind]
  }
  return parseLink({ rttMs: v.rttMs, mbps: v.mbps }, (field, detail) => fail(`${where}.${field === '' ? 'rttMs' : field}`, detail))
}
