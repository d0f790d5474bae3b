/**
 * Persistent libp2p identities: each agent and master keeps an Ed25519 private key in a file of mode 0600,
 * created on first use, so its peer id is stable across restarts and can be listed in other peers' trust files.
 *
 * File format: the libp2p `PrivateKey` protobuf (`KeyType` + key bytes; libp2p peer-id spec, "Keys"), as
 * @libp2p/crypto's `privateKeyToProtobuf` writes it and kubo keeps (base64) in its config. Like ssh with its private
 * keys, a key file readable by anyone but its owner is refused.
 */
import { closeSync, fstatSync, mkdirSync, openSync, readSync, writeSync } from 'node:fs'
import { homedir } from 'node:os'
import { dirname, isAbsolute, join } from 'node:path'
import { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { logger } from '@libp2p/logger'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { IdentityError } from './errors.ts'

const log = logger('edgeshard:agent:identity')

/** Largest key file read, bytes (an RSA-4096 protobuf is about 2.4 KB; Ed25519 is 68 bytes). */
const MAX_KEY_FILE_BYTES = 16 * 1024

/** A libp2p identity: the private key, its peer id, and the file it lives in (null = ephemeral, in memory only). */
export interface Identity {
  readonly privateKey: PrivateKey
  /** Peer id string, e.g. `12D3KooW…`. */
  readonly peerId: string
  readonly path: string | null
  /** True when this call created the key file. */
  readonly created: boolean
}

/**
 * Which identity of a device a process uses: the agent's (`edgeshard agent`, `split serve`: what workers' trust
 * lists name) or the master's (`run`, `serve`, `peers`, `split run`). Separate keys let a device run an agent and a
 * master at once without both claiming one peer id.
 */
export type IdentityRole = 'agent' | 'master'

/**
 * The default key file of `role`: `$XDG_CONFIG_HOME/edgeshard/{agent,master}.key`, or `~/.config/edgeshard/…` when
 * XDG_CONFIG_HOME is unset or not absolute (XDG Base Directory spec).
 */
export function defaultIdentityPath(role: IdentityRole, env: NodeJS.ProcessEnv = process.env): string {
  const config = env.XDG_CONFIG_HOME
  const base = config !== undefined && isAbsolute(config) ? config : join(homedir(), '.config')
  return join(base, 'edgeshard', `${role}.key`)
}

/**
 * Reads the identity key at `path`, creating it (a new Ed25519 key, mode 0600, parent folders 0700) when absent and
 * `create` is not false. Concurrent first runs agree on one key (exclusive create, then read).
 * @throws IdentityError naming the file: readable or writable by group/others (mode shown, `chmod 600` advised),
 *   owned by another user, not a regular file, not a libp2p private key, absent with `create: false`, or not
 *   creatable (the system error)
 */
export async function loadIdentity(path: string, options: { create?: boolean } = {}): Promise<Identity> {
  const existing = readKeyFile(path)
  if (existing !== null) return identityOf(parseKey(path, existing), path, false)
  if (options.create === false) throw new IdentityError(path, `identity key ${path} does not exist`)
  const privateKey = await generateKeyPair('Ed25519')
  const bytes = privateKeyToProtobuf(privateKey)
  try {
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 })
    const fd = openSync(path, 'wx', 0o600) // umask can only remove bits: the file is 0600 or stricter
    try {
      writeSync(fd, bytes)
    } finally {
      closeSync(fd)
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return loadIdentity(path, options) // another process won
    throw new IdentityError(path, `cannot create identity key ${path}: ${(err as Error).message}`, { cause: err })
  }
  log('created identity key %s', path)
  return identityOf(privateKey, path, true)
}

/** A fresh Ed25519 identity that lives only in memory (a new peer id on every start). */
export async function ephemeralIdentity(): Promise<Identity> {
  return identityOf(await generateKeyPair('Ed25519'), null, false)
}

function identityOf(privateKey: PrivateKey, path: string | null, created: boolean): Identity {
  return { privateKey, peerId: peerIdFromPrivateKey(privateKey).toString(), path, created }
}

/**
 * The bytes of a private file `path`, or null when it does not exist.
 * @throws IdentityError for loose permissions, another owner, not a regular file, too large, unreadable
 */
function readKeyFile(path: string): Uint8Array | null {
  let fd: number
  try {
    fd = openSync(path, 'r')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null
    throw new IdentityError(path, `cannot read identity key ${path}: ${(err as Error).message}`, { cause: err })
  }
  try {
    checkPrivateFile(fd, path, 'identity key', (message) => new IdentityError(path, message))
    const stat = fstatSync(fd)
    if (stat.size > MAX_KEY_FILE_BYTES) throw new IdentityError(path, `identity key ${path} is ${stat.size} bytes: not a libp2p private key (at most ${MAX_KEY_FILE_BYTES})`)
    const bytes = new Uint8Array(stat.size)
    let filled = 0
    while (filled < bytes.length) {
      const n = readSync(fd, bytes, filled, bytes.length - filled, filled)
      if (n === 0) break
      filled += n
    }
    return bytes.subarray(0, filled)
  } finally {
    closeSync(fd)
  }
}

function parseKey(path: string, bytes: Uint8Array): PrivateKey {
  try {
    return privateKeyFromProtobuf(bytes)
  } catch (err) {
    throw new IdentityError(
      path,
      `identity key ${path} (${bytes.length} bytes) is not a libp2p private key protobuf: ${(err as Error).message}; move it away to create a new one`,
      { cause: err },
    )
  }
}

/**
 * Refuses a secret file that others could read or write (like ssh's "UNPROTECTED PRIVATE KEY FILE"): it must be a
 * regular file owned by this user with no group/other permission bits. No-op on Windows (no POSIX modes).
 * @throws the error `makeError` builds from a one-line message naming the file, its mode and the fix
 */
export function checkPrivateFile(fd: number, path: string, what: string, makeError: (message: string) => Error): void {
  if (process.platform === 'win32') return
  const stat = fstatSync(fd)
  if (!stat.isFile()) throw makeError(`${what} ${path} is not a regular file`)
  const uid = process.getuid?.()
  if (uid !== undefined && stat.uid !== uid) throw makeError(`${what} ${path} is owned by uid ${stat.uid}, not by this user (uid ${uid})`)
  const mode = stat.mode & 0o777
  if ((mode & 0o077) !== 0) {
    throw makeError(`${what} ${path} has mode 0${mode.toString(8)}: it must be private to its owner (run: chmod 600 ${path})`)
  }
}
