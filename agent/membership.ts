/**
 * Cluster membership: trust files of peer ids, libp2p pre-shared network keys, and the check that the
 * workers a master dialled are distinct agents (a copied identity key makes two agents answer as one peer id).
 */
import { closeSync, openSync, readFileSync } from 'node:fs'
import { logger } from '@libp2p/logger'
import { peerIdFromString } from '@libp2p/peer-id'
import { DuplicateIdentityError, type TransportNode } from '../transport/index.ts'
import { MembershipConfigError } from './errors.ts'
import { checkPrivateFile } from './identity.ts'
import { probeAgent } from './peer-info.ts'

const log = logger('edgeshard:agent:membership')

/** Largest trust file read, bytes (about 20 000 peer ids). */
const MAX_TRUST_FILE_BYTES = 1024 * 1024

/**
 * Reads a trust file: one peer id per line (`12D3KooW…`, as `edgeshard identity` prints), `#` starts a comment
 * (whole line or after the id), blank lines ignored.
 * @returns the peer id strings (canonical form)
 * @throws MembershipConfigError naming the file (and line) when it is unreadable, over 1 MiB, lists no peer id, or a
 *   line is not a peer id
 */
export function readTrustFile(path: string): ReadonlySet<string> {
  let text: string
  try {
    const bytes = readFileSync(path)
    if (bytes.length > MAX_TRUST_FILE_BYTES) throw new MembershipConfigError(path, `trust file ${path} is ${bytes.length} bytes: at most ${MAX_TRUST_FILE_BYTES}`)
    text = bytes.toString('utf8')
  } catch (err) {
    if (err instanceof MembershipConfigError) throw err
    throw new MembershipConfigError(path, `cannot read trust file ${path}: ${(err as Error).message}`, { cause: err })
  }
  const peers = new Set<string>()
  for (const [i, raw] of text.split(/\r?\n/).entries()) {
    const line = raw.replace(/#.*/, '').trim()
    if (line === '') continue
    let peer: string
    try {
      peer = peerIdFromString(line).toString()
    } catch {
      const shown = line.length > 60 ? `${line.slice(0, 57)}...` : line
      throw new MembershipConfigError(path, `trust file ${path} line ${i + 1}: '${shown}' is not a peer ID (expected one like 12D3KooW…, as \`edgeshard identity\` prints)`)
    }
    peers.add(peer)
  }
  if (peers.size === 0) throw new MembershipConfigError(path, `trust file ${path} lists no peer ID: nobody could connect`)
  return peers
}

/** First line of a libp2p pre-shared key file (libp2p pnet spec, "Private Shared Key"). */
const PSK_TAG = '/key/swarm/psk/1.0.0/'

/**
 * Reads a libp2p private network key: three lines, `/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits (32 bytes),
 * e.g. made with `printf '/key/swarm/psk/1.0.0/\n/base16/\n%s\n' "$(openssl rand -hex 32)" > swarm.key`. The file is
 * a secret: like an identity key it must be mode 0600 (or stricter) and owned by this user.
 * @returns the key in the canonical form @libp2p/pnet's `preSharedKey` takes
 * @throws MembershipConfigError naming the file: unreadable, loose permissions, or not that format
 */
export function readPskFile(path: string): Uint8Array {
  let text: string
  try {
    const fd = openSync(path, 'r')
    try {
      checkPrivateFile(fd, path, 'pre-shared key', (message) => new MembershipConfigError(path, message))
      text = readFileSync(fd).subarray(0, 4096).toString('utf8')
    } finally {
      closeSync(fd)
    }
  } catch (err) {
    if (err instanceof MembershipConfigError) throw err
    throw new MembershipConfigError(path, `cannot read pre-shared key ${path}: ${(err as Error).message}`, { cause: err })
  }
  const [tag, codec, hex] = text.split(/\r?\n/).map((l) => l.trim())
  if (tag !== PSK_TAG || codec !== '/base16/' || hex === undefined || !/^[0-9a-fA-F]{64}$/.test(hex)) {
    throw new MembershipConfigError(path, `pre-shared key ${path} is not a libp2p swarm key: expected the lines ${PSK_TAG}, /base16/ and 64 hex digits`)
  }
  return new TextEncoder().encode(`${PSK_TAG}\n/base16/\n${hex.toLowerCase()}`)
}

/** A worker as the master reached it. */
export interface DialledWorker {
  /** Position in the plan (1..N-1). */
  readonly index: number
  readonly address: string
  /** Peer id the noise handshake proved. */
  readonly peer: string
}

/**
 * Refuses a cluster in which two workers answered with one peer id. Two cases look alike from libp2p (and without
 * a fresh connection per address libp2p would even reuse the first agent's connection for the second address): two
 * agents started from copies of one key, or one agent listed twice. The info protocol's per-process `instance` tells
 * them apart.
 * @throws DuplicateIdentityError naming the peer id and both addresses
 */
export async function checkDistinctWorkers(node: TransportNode, workers: readonly DialledWorker[], options: { signal?: AbortSignal } = {}): Promise<void> {
  const seen = new Map<string, DialledWorker>()
  for (const w of workers) {
    const first = seen.get(w.peer)
    if (first === undefined) {
      seen.set(w.peer, w)
      continue
    }
    // One after the other: libp2p joins concurrent dials to one peer id into one connection.
    const instances: (string | undefined)[] = []
    for (const x of [first, w]) {
      instances.push(
        await probeAgent(node, x.address, { ...options, fresh: true, rounds: 2 }).then(
          (probe) => probe.profile.instance,
          (err: unknown) => {
            log('cannot ask %s for its instance: %s', x.address, (err as Error).message)
            return undefined
          },
        ),
      )
    }
    if (instances[0] !== undefined && instances[0] === instances[1]) {
      throw new DuplicateIdentityError(
        w.peer,
        `workers ${first.index} and ${w.index} (${first.address} and ${w.address}) are the same agent, peer ${w.peer}: list each agent once`,
      )
    }
    throw new DuplicateIdentityError(
      w.peer,
      `peer ID ${w.peer} is used by two agents (${first.address} and ${w.address}): copy of an identity key?`,
    )
  }
}
