/**
 * `edgeshard peers`: lists the agents reachable from here (mDNS on the LAN plus `--bootstrap` addresses) with their
 * device profile, free memory, measured decode rate and round trip.
 */
import { type Command, Option } from 'commander'
import { discoverAgents } from '../discovery.ts'
import type { AgentProbe } from '../peer-info.ts'
import { collect, wholeNumber } from './arguments.ts'
import { addSecurityOptions, loadSecurity, type SecurityFlags } from './security.ts'

interface PeersFlags extends SecurityFlags {
  bootstrap?: string[]
  timeout: number
  json?: boolean
  mdns: boolean
}

async function peers(flags: PeersFlags): Promise<void> {
  // Agents with a trust file answer members only: ask with this device's identity (and its --psk).
  const security = await loadSecurity(flags, 'master')
  const agents = await discoverAgents({
    transport: { privateKey: security.identity.privateKey, ...(security.membership ? { membership: security.membership } : {}) },
    ...(flags.bootstrap ? { bootstrap: flags.bootstrap } : {}),
    timeoutMs: flags.timeout,
    mdns: flags.mdns,
  })
  agents.sort((a, b) => a.rttMs - b.rttMs)
  if (flags.json) {
    process.stdout.write(`${JSON.stringify(agents, null, 2)}\n`)
    return
  }
  if (agents.length === 0) {
    process.stderr.write(`edgeshard: no agents answered within ${flags.timeout} ms (start \`edgeshard agent\` on the other devices; --bootstrap ADDR where mDNS does not reach)\n`)
    return
  }
  process.stdout.write(formatTable(agents))
}

/** A fixed-width table of agents, one line each. */
export function formatTable(agents: readonly AgentProbe[]): string {
  const gib = (bytes: number): string => (bytes / 2 ** 30).toFixed(1)
  const rows = [
    ['PEER', 'ADDRESS', 'HOST', 'PLATFORM', 'CORES', 'FREE/TOTAL GiB', 'DECODE GB/s', 'LOAD', 'NODE', 'ORT', 'RTT ms', 'STATE'],
    ...agents.map((a) => [
      a.peer,
      a.address.replace(/\/p2p\/[^/]+$/, ''),
      a.profile.hostname,
      a.profile.platform,
      String(a.profile.cores),
      `${gib(a.profile.freeMemoryBytes)}/${gib(a.profile.totalMemoryBytes)}`,
      // measured by the agent (edgeshard profile): dense f32, 4-bit
      a.profile.measured ? `${a.profile.measured.decodeGBs.toFixed(1)}/${(a.profile.measured.decodeNBitsGBs ?? a.profile.measured.decodeGBs).toFixed(1)}` : '-',
      a.profile.loadAverage.toFixed(2),
      a.profile.nodeVersion,
      a.profile.ortVersion,
      a.rttMs.toFixed(2),
      a.profile.busy ? 'busy' : 'idle',
    ]),
  ]
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => r[col]!.length)))
  return rows.map((r) => `${r.map((cell, col) => cell.padEnd(widths[col]!)).join('  ').trimEnd()}\n`).join('')
}

/** Registers `edgeshard peers` on `program`. */
export function registerPeers(program: Command): void {
  const command = program
    .command('peers')
    .description('list the agents reachable from here (mDNS on the LAN, --bootstrap elsewhere): device, free memory, round trip')
    .option('--bootstrap <addrs>', 'agents to ask directly where mDNS does not reach (repeatable, comma-separated)', collect)
    .addOption(new Option('--timeout <ms>', 'how long to listen for agents').argParser(wholeNumber(1)).default(3000))
    .option('--no-mdns', 'ask the --bootstrap addresses only')
    .option('--json', 'print the agents as JSON (peer, address, profile, rttMs)')
  addSecurityOptions(command).action(peers)
}
