/**
 * Finding agents: mDNS on the LAN plus `bootstrap` addresses probed directly (routed networks), each agent asked for
 * its device profile over the info protocol.
 */
import { logger } from '@libp2p/logger'
import { TransportNode, type TransportNodeOptions } from '../transport/index.ts'
import { type AgentProbe, probeAgent } from './peer-info.ts'

const log = logger('edgeshard:agent:discovery')

/** Options of {@link discoverAgents}. */
export interface DiscoverOptions {
  /** Multiaddrs (with `/p2p/<peer id>` preferably) of agents to ask directly, for networks mDNS does not cross. */
  readonly bootstrap?: readonly string[]
  /** Return as soon as this many idle agents answered. Default: wait the whole `timeoutMs`. */
  readonly wanted?: number
  /** How long to listen for agents, ms. */
  readonly timeoutMs: number
  /** mDNS query interval, ms. Default 1000. */
  readonly queryIntervalMs?: number
  /** Listen for mDNS answers at all (false: bootstrap addresses only). Default true. */
  readonly mdns?: boolean
  readonly signal?: AbortSignal
  /** Called as each agent answers. */
  readonly onFound?: (agent: AgentProbe) => void
  /** Identity and membership of the asking node (agents with a trust file answer members only). Default: a fresh key. */
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership'>
}

/**
 * Listens on the LAN for agents (mDNS, without announcing itself) and probes `bootstrap` addresses, asks each agent
 * found for its profile and round trip, and returns them in the order they answered. An agent that announces several
 * addresses is reached on a non-loopback one first. Agents that cannot be reached are left out (logged).
 * @throws the signal's reason when `signal` aborts.
 */
export async function discoverAgents(options: DiscoverOptions): Promise<AgentProbe[]> {
  const found = new Map<string, AgentProbe>()
  const tried = new Set<string>()
  const probes: Promise<void>[] = []
  let enough: () => void = () => {}
  const enoughFound = new Promise<void>((resolve) => {
    enough = resolve
  })
  const idle = (): number => [...found.values()].filter((a) => !a.profile.busy).length
  const controller = new AbortController()
  const signal = options.signal ? AbortSignal.any([options.signal, controller.signal]) : controller.signal

  const probe = (peer: string | null, addresses: readonly string[]): void => {
    if (peer !== null) {
      if (tried.has(peer)) return
      tried.add(peer)
    }
    const ordered = [...addresses].sort((a, b) => Number(isLoopback(a)) - Number(isLoopback(b)))
    probes.push(
      (async () => {
        for (const address of ordered) {
          try {
            const agent = await probeAgent(node, address, { signal })
            if (found.has(agent.peer)) return
            found.set(agent.peer, agent)
            log('agent %s at %s: %o', agent.peer, address, agent.profile)
            options.onFound?.(agent)
            if (options.wanted !== undefined && idle() >= options.wanted) enough()
            return
          } catch (err) {
            if (signal.aborted) return
            log('no agent at %s: %s', address, (err as Error).message)
          }
        }
      })(),
    )
  }

  const node = new TransportNode({
    listen: [],
    ...options.transport,
    ...(options.mdns === false
      ? {}
      : {
          mdns: { announce: false, queryIntervalMs: options.queryIntervalMs ?? 1000 },
          onPeerDiscovered: (p) => probe(p.peer, p.addresses),
        }),
  })
  await node.start()
  let timer: NodeJS.Timeout | undefined
  try {
    for (const address of options.bootstrap ?? []) probe(null, [address])
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, options.timeoutMs)
    })
    const aborted = new Promise<never>((_, reject) => {
      if (options.signal?.aborted) reject(options.signal.reason)
      options.signal?.addEventListener('abort', () => reject(options.signal?.reason), { once: true })
    })
    // Without mDNS the bootstrap answers are all there is to wait for.
    const bootstrapOnly = options.mdns === false ? Promise.allSettled(probes).then(() => {}) : new Promise<void>(() => {})
    await Promise.race([timeout, enoughFound, aborted, bootstrapOnly])
    // Without a count to wait for, probes still in flight at the deadline get a moment to finish.
    if (options.wanted === undefined) await Promise.race([Promise.allSettled(probes), delay(1000)])
  } finally {
    clearTimeout(timer)
    controller.abort()
    await node.stop()
  }
  return [...found.values()]
}

function isLoopback(address: string): boolean {
  return /^\/ip4\/127\.|^\/ip6\/::1\//.test(address)
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref())
}
