import { readdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { describe, expect, it } from 'vitest'
import {
  ClusterFileError,
  clusterLink,
  DEFAULT_BUDGET_FRACTION,
  DEVICE_PROFILE_NAMES,
  DEVICE_PROFILES,
  parseByteSize,
  parseCapabilities,
  parseClusterFile,
  readClusterFile,
  TYPICAL_LINKS,
} from '../../devices/index.ts'

const EXAMPLES = fileURLToPath(new URL('../../devices/examples/', import.meta.url))

function parseError(doc: unknown): ClusterFileError {
  try {
    parseClusterFile(typeof doc === 'string' ? doc : JSON.stringify(doc), 'c.json')
  } catch (err) {
    expect(err).toBeInstanceOf(ClusterFileError)
    expect((err as Error).name).toBe('ClusterFileError')
    expect((err as Error).message).not.toContain('\n')
    return err as ClusterFileError
  }
  throw new Error('expected a ClusterFileError')
}

describe('device profiles', () => {
  it('lists the six real devices with every capability a finite number > 0', () => {
    expect(DEVICE_PROFILE_NAMES).toEqual(['raspberry-pi-4b', 'raspberry-pi-5', 'jetson-nano', 'jetson-orin-nano', 'android-snapdragon-7', 'laptop'])
    for (const name of DEVICE_PROFILE_NAMES) {
      const p = DEVICE_PROFILES[name]!
      expect(p.name).toBe(name)
      expect(parseCapabilities(p.capabilities)).toEqual(p.capabilities)
      expect(p.links.length).toBeGreaterThan(0)
    }
    // Spot checks against the sources cited in devices/profiles.ts.
    expect(DEVICE_PROFILES['raspberry-pi-4b']!.capabilities).toMatchObject({ memoryBytes: 4 * 2 ** 30, cores: 4, decodeGBs: 3.5, diskReadMBs: 44 })
    expect(DEVICE_PROFILES['raspberry-pi-5']!.capabilities.decodeGBs).toBe(10.5)
    expect(TYPICAL_LINKS.gbe.mbps).toBe(940)
  })
})

describe('cluster files', () => {
  it('reads the example files', () => {
    const files = readdirSync(EXAMPLES).filter((f) => f.endsWith('.json'))
    expect(files.length).toBeGreaterThanOrEqual(2)
    for (const f of files) {
      const c = readClusterFile(`${EXAMPLES}${f}`)
      expect(c.devices.length).toBeGreaterThan(0)
    }
  })

  it('resolves profiles, budgets, cpu shares and links', () => {
    const c = parseClusterFile(
      JSON.stringify({
        devices: [
          { name: 'laptop', profile: 'laptop', cpu: 1, memoryBudget: '2GiB' },
          { name: 'pi-a', profile: 'raspberry-pi-4b', cpu: 0.25 },
          { name: 'x', profile: { memoryBytes: 2e9, cores: 4, decodeGBs: 4, prefillGflops: 20, diskReadMBs: 80 }, memoryBudget: 1500000000 },
        ],
        links: {
          default: { rttMs: 1, mbps: 1000 },
          pairs: [
            { between: ['laptop', 'pi-a'], rttMs: 10, mbps: 100 },
            { between: ['x', 'pi-a'], link: 'wifi5' },
          ],
        },
      }),
      'c.json',
    )
    expect(c.devices.map((d) => d.name)).toEqual(['laptop', 'pi-a', 'x'])
    expect(c.devices[0]).toMatchObject({ profile: 'laptop', cpu: 1, memoryBudgetBytes: 2 * 2 ** 30 })
    expect(c.devices[0]!.capabilities).toBe(DEVICE_PROFILES.laptop!.capabilities)
    expect(c.devices[1]).toMatchObject({ profile: 'raspberry-pi-4b', cpu: 0.25, memoryBudgetBytes: Math.floor(4 * 2 ** 30 * DEFAULT_BUDGET_FRACTION) })
    expect(c.devices[2]).toMatchObject({ profile: 'inline', memoryBudgetBytes: 1500000000 })
    expect(c.devices[2]!.cpu).toBeUndefined()
    expect(clusterLink(c, 'laptop', 'pi-a')).toEqual({ rttMs: 10, mbps: 100 })
    expect(clusterLink(c, 1, 0)).toEqual({ rttMs: 10, mbps: 100 })
    expect(clusterLink(c, 2, 1)).toEqual(TYPICAL_LINKS.wifi5)
    expect(clusterLink(c, 'laptop', 'x')).toEqual({ rttMs: 1, mbps: 1000 })
    expect(clusterLink(c, 2, 2)).toEqual({ rttMs: 0, mbps: Number.POSITIVE_INFINITY })
    expect(() => clusterLink(c, 'nope', 0)).toThrow(RangeError)
  })

  it('reads the optional cost-model figures of an inline profile', () => {
    const profile = { memoryBytes: 2e9, cores: 0.25, decodeGBs: 4, decodeNBitsGBs: 5, prefillGflops: 20, diskReadMBs: 80, blockOverheadMs: 1.2, messageOverheadMs: 0 }
    const c = parseClusterFile(JSON.stringify({ devices: [{ name: 'x', profile }] }), 'c.json')
    expect(c.devices[0]!.capabilities).toEqual(profile)
    expect(parseError({ devices: [{ name: 'x', profile: { ...profile, blockOverheadMs: -0.1 } }] }).message).toBe(
      'cannot read cluster file c.json: devices[0].profile.blockOverheadMs: expected a number ≥ 0, got -0.1',
    )
  })

  it('defaults every link to typical gigabit Ethernet', () => {
    const c = parseClusterFile('{"devices":[{"name":"a","profile":"laptop"},{"name":"b","profile":"jetson-nano"}]}', 'c.json')
    expect(clusterLink(c, 0, 1)).toEqual(TYPICAL_LINKS.gbe)
  })

  it('names the file, the JSON path and what was expected', () => {
    expect(parseError('{').message).toMatch(/^cannot read cluster file c\.json: \$: not JSON: /)
    expect(parseError({ devices: [] }).message).toBe(
      'cannot read cluster file c.json: devices: expected a non-empty array of devices (the first is the master), got an array',
    )
    const unknownProfile = parseError({ devices: [{ name: 'a', profile: 'laptop' }, { name: 'b', profile: 'pi9' }] })
    expect(unknownProfile.jsonPath).toBe('devices[1].profile')
    expect(unknownProfile.message).toContain('expected a known profile (raspberry-pi-4b, raspberry-pi-5, jetson-nano, jetson-orin-nano, android-snapdragon-7, laptop) or an object, got "pi9"')
    expect(parseError({ devices: [{ name: 'a', profile: { memoryBytes: 1, cores: 1, decodeGBs: 0, prefillGflops: 1, diskReadMBs: 1 } }] }).message).toBe(
      'cannot read cluster file c.json: devices[0].profile.decodeGBs: expected a number > 0, got 0',
    )
    expect(parseError({ devices: [{ name: 'a', profile: 'laptop', memoryBudget: '2 gigs' }] }).jsonPath).toBe('devices[0].memoryBudget')
    expect(parseError({ devices: [{ name: 'a', profile: 'laptop', cpu: -1 }] }).jsonPath).toBe('devices[0].cpu')
    expect(parseError({ devices: [{ name: 'a', profile: 'laptop', gpu: 1 }] }).message).toBe(
      'cannot read cluster file c.json: devices[0].gpu: unknown field (expected name, profile, cpu, memoryBudget)',
    )
    expect(parseError({ devices: [{ name: 'a', profile: 'laptop' }, { name: 'a', profile: 'laptop' }] }).message).toContain(
      'devices[1].name: expected a unique name, got "a" (also devices[0])',
    )
    const devices = [
      { name: 'a', profile: 'laptop' },
      { name: 'b', profile: 'laptop' },
    ]
    expect(parseError({ devices, links: { pairs: [{ between: ['a', 'c'], rttMs: 1, mbps: 1 }] } }).message).toContain(
      'links.pairs[0].between[1]: expected a device name (a, b), got "c"',
    )
    expect(parseError({ devices, links: { pairs: [{ between: ['a', 'b'], rttMs: -1, mbps: 1 }] } }).message).toContain(
      'links.pairs[0].rttMs: expected a number ≥ 0, got -1',
    )
    expect(parseError({ devices, links: { default: { link: 'lte' } } }).message).toContain(
      'links.default.link: expected a typical link (gbe, wifi5, wifi6), got "lte"',
    )
    expect(
      parseError({
        devices,
        links: {
          pairs: [
            { between: ['a', 'b'], link: 'gbe' },
            { between: ['b', 'a'], link: 'gbe' },
          ],
        },
      }).message,
    ).toContain('links.pairs[1].between: expected each pair once, got b–a again')
    expect(() => readClusterFile('/nonexistent/cluster.json')).toThrow(/^cannot read cluster file \/nonexistent\/cluster\.json: \$: cannot open: /)
  })

  it('parses byte sizes', () => {
    expect(parseByteSize('512MB')).toBe(512e6)
    expect(parseByteSize('2GiB')).toBe(2 * 2 ** 30)
    expect(parseByteSize('1.5 kB')).toBe(1500)
    expect(parseByteSize('300000000')).toBe(3e8)
    expect(parseByteSize('2 gigs')).toBeUndefined()
  })
})
