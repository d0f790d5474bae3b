/**
 * Identity and membership flags shared by `agent`, `run`, `serve`, `peers` and `split`, and the
 * `edgeshard identity` command that prints this device's peer id for other devices' trust files.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type Command, Option } from 'commander'
import { peerIdFromString } from '@libp2p/peer-id'
import type { MembershipOptions, MembershipRefusal } from '../../transport/index.ts'
import { UsageError } from '../errors.ts'
import { defaultIdentityPath, ephemeralIdentity, type Identity, type IdentityRole, loadIdentity } from '../identity.ts'
import { readPskFile, readTrustFile } from '../membership.ts'
import { collect } from './arguments.ts'

/** The flags `addSecurityOptions` defines. */
export interface SecurityFlags {
  /** `--identity FILE`; false with `--no-identity` (a fresh key for this run); undefined = the default file. */
  identity?: string | false
  /** `--trust FILE`: peer ids admitted. */
  trust?: string
  /** `--trust-peer ID,...`: more peer ids admitted. */
  trustPeer?: string[]
  /** `--psk FILE`: libp2p private network key. */
  psk?: string
}

/** Adds --identity/--no-identity, --trust, --trust-peer and --psk to `command`. */
export function addSecurityOptions(command: Command): Command {
  return command
    .option('--identity <file>', 'libp2p identity key, created with mode 0600 on first use (default: $XDG_CONFIG_HOME or ~/.config, then edgeshard/agent.key for agents, master.key for masters)')
    .option('--no-identity', 'use a fresh key for this process only (a new peer id each start)')
    .option('--trust <file>', 'admit only the peer ids in this file (one per line, # comments; see `edgeshard identity`)')
    .option('--trust-peer <id>', 'admit this peer id too (repeatable, comma-separated)', collect)
    .option('--psk <file>', 'private network: peers without this pre-shared key cannot connect (a /key/swarm/psk/1.0.0/ file, mode 0600)')
}

/** This process's identity and who it admits. */
export interface Security {
  readonly identity: Identity
  /** For TransportNodeOptions.membership; undefined when any peer is admitted. */
  readonly membership: MembershipOptions | undefined
  /** With a trust set: admit `peer` too (e.g. a local worker the master spawned); no-op without one. */
  admit(peer: string): void
  /** Whether peers are filtered by id (a trust file or --trust-peer). */
  readonly trusting: boolean
  /** The --psk file, if any. */
  readonly pskPath: string | undefined
}

/**
 * Loads the identity key (creating the given file, or the default file of `role`, on first use) and the membership
 * files.
 * @throws IdentityError (key file: loose permissions, malformed); MembershipConfigError (trust or key file);
 *   UsageError for a --trust-peer that is not a peer id
 */
export async function loadSecurity(
  flags: SecurityFlags,
  role: IdentityRole,
  hooks: { onRefused?: (refusal: MembershipRefusal) => void } = {},
): Promise<Security> {
  const identity = flags.identity === false ? await ephemeralIdentity() : await loadIdentity(flags.identity ?? defaultIdentityPath(role))
  let trusted: Set<string> | undefined
  const sources: string[] = []
  if (flags.trust !== undefined) {
    trusted = new Set(readTrustFile(flags.trust))
    sources.push(`trust file ${flags.trust}`)
  }
  for (const id of flags.trustPeer ?? []) {
    let peer: string
    try {
      peer = peerIdFromString(id).toString()
    } catch {
      throw new UsageError(`--trust-peer ${JSON.stringify(id)} is not a peer ID (expected one like 12D3KooW…)`)
    }
    trusted ??= new Set()
    trusted.add(peer)
    if (!sources.includes('--trust-peer')) sources.push('--trust-peer')
  }
  const psk = flags.psk === undefined ? undefined : readPskFile(flags.psk)
  const membership: MembershipOptions | undefined =
    trusted === undefined && psk === undefined
      ? undefined
      : {
          ...(trusted === undefined ? {} : { trustedPeers: trusted, trustSource: sources.join(' or ') }),
          ...(psk === undefined ? {} : { psk }),
          ...(hooks.onRefused ? { onRefused: hooks.onRefused } : {}),
        }
  return {
    identity,
    membership,
    admit: (peer) => trusted?.add(peer),
    trusting: trusted !== undefined,
    pskPath: flags.psk,
  }
}

/** Identity and membership flags for the local workers a master spawns (`run --peers N`). */
export interface LocalWorkerIdentities {
  /** Flags of worker `i` (1-based). */
  args(i: number): string[]
  /** Deletes the temporary key files (call once the workers have started: they read them at start). */
  cleanup(): void
}

/**
 * Flags for `count` local workers. Without a trust set: `--no-identity` (a fresh key each) and the master's --psk.
 * With one, the master makes their keys up front (temporary files, mode 0600, in a private folder) so that every
 * local worker can admit exactly the master and its siblings (`--trust-peer`), and the master admits them too.
 */
export async function localWorkerIdentities(security: Security, count: number): Promise<LocalWorkerIdentities> {
  const psk = security.pskPath === undefined ? [] : ['--psk', security.pskPath]
  if (!security.trusting || count === 0) return { args: () => ['--no-identity', ...psk], cleanup: () => {} }
  const dir = mkdtempSync(join(tmpdir(), 'edgeshard-keys-')) // mode 0700
  const keys = await Promise.all(Array.from({ length: count }, (_, i) => loadIdentity(join(dir, `worker-${i + 1}.key`))))
  for (const key of keys) security.admit(key.peerId)
  const members = [security.identity.peerId, ...keys.map((k) => k.peerId)].join(',')
  return {
    args: (i) => ['--identity', keys[i - 1]!.path!, '--trust-peer', members, ...psk],
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  }
}

/** One line for a refused non-member, e.g. `refused peer 12D3… from /ip4/…: not in trust file F`. */
export function describeRefusal(refusal: MembershipRefusal, membership: MembershipOptions | undefined): string {
  const where = refusal.direction === 'inbound' ? `from ${refusal.address}` : `at ${refusal.address}`
  const what = refusal.protocol === undefined ? '' : ` (${refusal.protocol})`
  return `refused peer ${refusal.peer} ${where}${what}: not in ${membership?.trustSource ?? 'the trusted peer ids'}`
}

/** Registers `edgeshard identity`: prints this device's peer id (creating the key file on first use). */
export function registerIdentity(program: Command): void {
  program
    .command('identity')
    .description("print this device's peer id (for other devices' trust files), creating its identity key on first use")
    .option('--identity <file>', 'identity key file (default: $XDG_CONFIG_HOME or ~/.config, then edgeshard/<role>.key)')
    .addOption(new Option('--role <role>', 'which of the device\'s identities: its agent\'s or its master\'s').choices(['agent', 'master']).default('agent'))
    .action(async (flags: { identity?: string; role: IdentityRole }) => {
      const path = flags.identity ?? defaultIdentityPath(flags.role)
      const identity = await loadIdentity(path)
      if (identity.created) process.stderr.write(`edgeshard: created identity key ${path}\n`)
      process.stdout.write(`${identity.peerId}\n`)
    })
}
