/**
 * Peers that come back, or new ones, are used from the next request on. A long-lived master (`edgeshard
 * serve`) calls {@link Rejoiner.beforeRequest} before each generation starts, never during one: it dials the workers
 * the cluster was started with that it lacks now (a worker lost earlier and restarted, same address) and, with
 * discovery, idle agents found on the network since (mDNS on the LAN, `--bootstrap` addresses), and when any answers
 * the cluster re-plans over everyone and re-shards ({@link Cluster.admit}). An address that does not answer is tried
 * again after a back-off (1 s, doubling up to 30 s) so a dead device does not slow every request.
 */
import { logger } from '@libp2p/logger'
import type { AdmitReport } from './cluster.ts'
import { TransportNode, type TransportNodeOptions } from '../transport/index.ts'
import { type AgentProbe, probeAgent } from './peer-info.ts'

const log = logger('edgeshard:agent:rejoin')

/** What the rejoiner needs of a cluster ({@link Cluster} has it). */
export interface RejoinTarget {
  /** Workers in the plan now. */
  readonly workers: readonly { readonly device: number; readonly address: string; readonly peer: string }[]
  admit(addresses: readonly string[], options?: { signal?: AbortSignal; dialTimeoutMs?: number }): Promise<AdmitReport>
}

/** Agents heard of on the network, for {@link RejoinOptions.discovery} (see {@link DiscoveryWatch}). */
export interface AgentSource {
  /** Every agent heard of so far: its peer id when known (mDNS), and its addresses (best first). */
  candidates(): readonly { readonly peer: string | null; readonly addresses: readonly string[] }[]
  /** Asks the agent at `address` for its profile (is it idle?). */
  probe(address: string, options: { signal: AbortSignal }): Promise<AgentProbe>
}

/** Options of {@link Rejoiner}. */
export interface RejoinOptions {
  /** Addresses of the workers the cluster was started with: dialled again while missing from the cluster. */
  readonly addresses: readonly string[]
  /** New agents: each one heard of, not in the cluster and idle is admitted. Default none. */
  readonly discovery?: AgentSource
  /** How long one dial or profile request may take, ms. Default 1000. */
  readonly dialTimeoutMs?: number
  /** Back-off after an address did not answer, ms, doubled each time up to `maxRetryMs`. Default 1000. */
  readonly retryMs?: number
  /** Longest back-off, ms. Default 30 000. */
  readonly maxRetryMs?: number
  /** Clock, ms (tests). Default `performance.now`. */
  readonly now?: () => number
}

/** The back-off of one address that did not answer. */
interface Retry {
  readonly failures: number
  readonly dueAt: number
}

/**
 * Brings missing and new workers into a cluster between requests. Not thread-safe: call {@link beforeRequest} from one
 * generation queue (the server's), before each generation.
 */
export class Rejoiner {
  readonly #target: RejoinTarget
  readonly #options: RejoinOptions
  readonly #retries = new Map<string, Retry>()
  readonly #now: () => number

  constructor(target: RejoinTarget, options: RejoinOptions) {
    this.#target = target
    this.#options = options
    this.#now = options.now ?? (() => performance.now())
  }

  /** Addresses of the workers the cluster was started with that it lacks now, whose back-off has passed. */
  due(): string[] {
    const live = new Set(this.#target.workers.map((w) => w.address))
    return [...new Set(this.#options.addresses)].filter((a) => !live.has(a) && this.#isDue(a))
  }

  /**
   * Dials what is missing or new and, when any answers, lets the cluster admit it (re-plan, re-shard).
   * @returns the cluster's report when some address was dialled, else null (nothing missing, or all backing off)
   * @throws what {@link RejoinTarget.admit} throws (the cluster failed); an address that does not answer is no error
   */
  async beforeRequest(options: { signal?: AbortSignal } = {}): Promise<AdmitReport | null> {
    const wanted = this.due()
    wanted.push(...(await this.#discovered(options.signal)).filter((a) => !wanted.includes(a)))
    if (wanted.length === 0) return null
    const dialTimeoutMs = this.#options.dialTimeoutMs ?? 1000
    const report = await this.#target.admit(wanted, { dialTimeoutMs, ...(options.signal ? { signal: options.signal } : {}) })
    const failed = new Set(report.unreachable.map((u) => u.address))
    for (const address of wanted) {
      if (failed.has(address)) this.#failed(address)
      else this.#retries.delete(address)
    }
    log('dialled %d addresses: %d admitted, %d unreachable', wanted.length, report.admitted.length, report.unreachable.length)
    return report
  }

  /** Addresses of idle agents discovery heard of that are not in the cluster (one per agent, the first that answers). */
  async #discovered(signal: AbortSignal | undefined): Promise<string[]> {
    const source = this.#options.discovery
    if (!source) return []
    const peers = new Set(this.#target.workers.map((w) => w.peer))
    const addresses = new Set(this.#target.workers.map((w) => w.address))
    const candidates = source.candidates().filter((c) => (c.peer === null || !peers.has(c.peer)) && !c.addresses.some((a) => addresses.has(a)))
    const timeout = AbortSignal.timeout(this.#options.dialTimeoutMs ?? 1000)
    const probeSignal = signal ? AbortSignal.any([signal, timeout]) : timeout
    const found = await Promise.all(
      candidates.map(async (c) => {
        for (const address of c.addresses) {
          if (!this.#isDue(address)) continue
          try {
            const agent = await source.probe(address, { signal: probeSignal })
            this.#retries.delete(address)
            if (peers.has(agent.peer)) return null // in the cluster already, reached at another address
            if (agent.profile.busy) {
              log('agent %s at %s is busy with another master', agent.peer, address)
              this.#failed(address) // asked again after the back-off
              return null
            }
            return address
          } catch (err) {
            log('no agent at %s: %s', address, (err as Error).message)
            this.#failed(address)
          }
        }
        return null
      }),
    )
    return found.filter((a) => a !== null)
  }

  #isDue(address: string): boolean {
    const retry = this.#retries.get(address)
    return retry === undefined || this.#now() >= retry.dueAt
  }

  #failed(address: string): void {
    const failures = (this.#retries.get(address)?.failures ?? 0) + 1
    const waitMs = Math.min(this.#options.maxRetryMs ?? 30_000, (this.#options.retryMs ?? 1000) * 2 ** (failures - 1))
    this.#retries.set(address, { failures, dueAt: this.#now() + waitMs })
  }
}

/** Options of {@link DiscoveryWatch}. */
export interface DiscoveryWatchOptions {
  /** Agents to ask directly, for networks mDNS does not cross. */
  readonly bootstrap?: readonly string[]
  /** Listen for mDNS announcements. Default true. */
  readonly mdns?: boolean
  /** mDNS query interval, ms. Default 5000 (a long-lived watch needs no fast queries). */
  readonly queryIntervalMs?: number
  /** Identity and membership of the asking node (agents with a trust file answer members only). */
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
}

/**
 * Listens on the LAN for agents announcing themselves by mDNS for as long as it runs (without announcing itself), and
 * keeps the `bootstrap` addresses, as {@link AgentSource} candidates; probes them over the info protocol.
 */
export class DiscoveryWatch implements AgentSource {
  readonly #options: DiscoveryWatchOptions
  readonly #heard = new Map<string, readonly string[]>()
  readonly #node: TransportNode

  constructor(options: DiscoveryWatchOptions) {
    this.#options = options
    this.#node = new TransportNode({
      listen: [],
      ...options.transport,
      ...(options.mdns === false
        ? {}
        : {
            mdns: { announce: false, queryIntervalMs: options.queryIntervalMs ?? 5000 },
            // Non-loopback addresses first: a device on the LAN is reached there.
            onPeerDiscovered: (p) => this.#heard.set(p.peer, [...p.addresses].sort((a, b) => Number(isLoopback(a)) - Number(isLoopback(b)))),
          }),
    })
  }

  async start(): Promise<void> {
    await this.#node.start()
  }

  async stop(): Promise<void> {
    await this.#node.stop()
  }

  candidates(): { peer: string | null; addresses: readonly string[] }[] {
    return [...(this.#options.bootstrap ?? []).map((a) => ({ peer: null, addresses: [a] })), ...[...this.#heard].map(([peer, addresses]) => ({ peer, addresses }))]
  }

  probe(address: string, options: { signal: AbortSignal }): Promise<AgentProbe> {
    return probeAgent(this.#node, address, { signal: options.signal, rounds: 2 })
  }
}

function isLoopback(address: string): boolean {
  return /^\/ip4\/127\.|^\/ip6\/::1\//.test(address)
}
