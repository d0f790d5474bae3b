/**
 * A minimal libp2p 3 node for edgeshard: TCP (TCP_NODELAY), Noise encryption, Yamux multiplexing (keepalive on), and
 * optionally mDNS discovery on the LAN (`mdns`); no identify, ping, connection monitor or DHT. Dialling a protocol needs
 * none of them: `connection.newStream` negotiates the protocol with multistream-select over the Yamux stream.
 *
 * Liveness: Yamux keepalive (every 30 s) keeps idle sockets open (@libp2p/tcp closes sockets idle for 2 minutes) but
 * does not detect a silently dead peer; callers bound waits with `signal` (e.g. `AbortSignal.timeout`).
 *
 * Data path (measured in bench/allreduce.ts): noise always encrypts, with OpenSSL's ChaCha20-Poly1305 and
 * X25519 (`noise-crypto.ts`, interoperable with any libp2p noise peer); each libp2p send is one socket write and
 * noise's decoder builds no Error per message (`connection-tuning.ts`); yamux grants receive window per half window
 * instead of per frame (`yamux-window.ts`); frames are padded so tensor bodies arrive 8-byte aligned (no copy).
 *
 * Membership: `membership.trustedPeers` admits only the listed peer ids. The connection gater refuses any
 * other peer right after the noise handshake (before a muxer or a stream exists), in both directions, and every
 * inbound stream is checked again before its handler runs; refusals are logged with the peer id. `membership.psk`
 * makes this node a libp2p private network (XSalsa20 under noise, @libp2p/pnet): a peer without the same key cannot
 * complete a connection at all. Noise stays on in every case: nothing is ever sent in plaintext.
 */
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import type { Connection, Libp2p, PeerDiscovery, PrivateKey, Stream } from '@libp2p/interface'
import { logger } from '@libp2p/logger'
import { mdns } from '@libp2p/mdns'
import { preSharedKey } from '@libp2p/pnet'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import type { FramedChannelOptions } from './channel.ts'
import { FramedChannel } from './channel.ts'
import { withConnectionTuning } from './connection-tuning.ts'
import { ChannelClosedError, DialError, DuplicateIdentityError, MembershipError, NotStartedError } from './errors.ts'
import { nodeNoiseCrypto } from './noise-crypto.ts'
import { batchWindowUpdates } from './yamux-window.ts'
import { MDNS_SERVICE_TAG } from './protocols.ts'

const log = logger('edgeshard:transport')

/** Default bound on `dial` when no signal is given, ms. */
export const DEFAULT_DIAL_TIMEOUT_MS = 10_000
/**
 * Bytes of yamux's data-frame header, which precedes a frame sent alone in the message the receiver decrypts; frames
 * are padded so that their bodies land 8-byte aligned after it (see `FrameOptions.frameStartOffset`).
 */
const YAMUX_HEADER_BYTES = 12
/** How long `stop()` waits for libp2p to close its connections gracefully. */
const STOP_TIMEOUT_MS = 1_000

/** Options of a `TransportNode`. */
export interface TransportNodeOptions extends FramedChannelOptions {
  /** Multiaddrs to listen on, e.g. `['/ip4/127.0.0.1/tcp/0']` (port 0 = any free port). Default: none (dial only). */
  listen?: readonly string[]
  /** Node identity; a fresh Ed25519 key when absent (so the peer id changes on every start). */
  privateKey?: PrivateKey
  /** Bound on every `dial`, ms, applied together with the caller's signal. Default 10 000. */
  dialTimeoutMs?: number
  /** Take part in mDNS discovery on the LAN (multicast 224.0.0.251:5353 on every interface). Default: off. */
  mdns?: DiscoveryOptions
  /** Called each time mDNS reports a peer (repeats as the peer answers later queries). */
  onPeerDiscovered?: (peer: DiscoveredPeer) => void
  /**
   * Called when mDNS hears another process announce this node's own peer id (its addresses, without `/p2p/`): two
   * processes started from copies of one identity key. libp2p itself drops such answers silently.
   */
  onSelfDiscovered?: (addresses: readonly string[]) => void
  /** Who may connect. Default: any peer that completes the noise handshake. */
  membership?: MembershipOptions
}

/** Cluster membership: a set of trusted peer ids, a pre-shared network key, or both. */
export interface MembershipOptions {
  /** Peer id strings admitted, e.g. from a trust file. Absent: every peer id is admitted. */
  trustedPeers?: ReadonlySet<string>
  /** Where `trustedPeers` came from, named in refusals (e.g. `trust file /etc/edgeshard/trust`). */
  trustSource?: string
  /**
   * A libp2p private network key: the bytes of a `/key/swarm/psk/1.0.0/` file (three lines: that tag, `/base16/`,
   * 64 hex digits). Peers without the same key fail the connection before noise. Source: libp2p pnet spec.
   */
  psk?: Uint8Array
  /** Called for each refused non-member (after the log line), e.g. to print it. */
  onRefused?: (refusal: MembershipRefusal) => void
}

/** One refused peer: its id, the remote address, which side dialled, and the protocol when a stream was refused. */
export interface MembershipRefusal {
  readonly peer: string
  readonly address: string
  readonly direction: 'inbound' | 'outbound'
  readonly protocol?: string
}

/** Options of `TransportNode.dial`. */
export interface DialOptions {
  signal?: AbortSignal
  /**
   * Open a new connection even when one to the same peer id is open (libp2p otherwise reuses it, so a second address
   * announcing the same peer id would silently reach the first process). Default false.
   */
  fresh?: boolean
}

/** mDNS discovery settings (RFC 6762 multicast DNS, as libp2p's mDNS spec uses it). */
export interface DiscoveryOptions {
  /** Answer queries with this node's listen addresses, i.e. be found (private and loopback ones only). Default true. */
  announce?: boolean
  /** How often this node asks the LAN, ms (it also asks once at start). Default 10 000. */
  queryIntervalMs?: number
  /** Service name asked for and answered. Default `MDNS_SERVICE_TAG` (edgeshard agents only). */
  serviceTag?: string
}

/** A peer found on the LAN: its id and full multiaddrs (with `/p2p/<peer id>`), as it announced them. */
export interface DiscoveredPeer {
  readonly peer: string
  readonly addresses: readonly string[]
}

interface AbortableOptions {
  signal?: AbortSignal
}

/** Called with each inbound channel; a thrown error or rejection aborts that channel (never crashes the node). */
export type ChannelHandler = (channel: FramedChannel) => void | Promise<void>

/**
 * One process's libp2p endpoint: listens, accepts framed channels for registered protocols, dials framed channels.
 *
 * @example
 * const node = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
 * await node.start()
 * await node.handle(TENSOR_PARALLEL_PROTOCOL, (channel) => serve(channel))
 * const channel = await other.dial(node.multiaddrs()[0]!, TENSOR_PARALLEL_PROTOCOL, { signal: AbortSignal.timeout(5000) })
 */
export class TransportNode {
  private readonly options: TransportNodeOptions
  private readonly channelOptions: FramedChannelOptions
  private libp2p: Libp2p | undefined
  private readonly channels = new Set<FramedChannel>()
  /** Outbound connections the gater refused: dialled address (without `/p2p/`) → peer id, for `dial`'s error. */
  private readonly refusedDials = new Map<string, string>()

  constructor(options: TransportNodeOptions = {}) {
    this.options = options
    this.channelOptions = { frameStartOffset: YAMUX_HEADER_BYTES, ...options }
  }

  /** Start listening. Idempotent. @throws whatever libp2p throws for a bad or busy listen address */
  async start(_options: AbortableOptions = {}): Promise<void> {
    if (this.libp2p !== undefined) return
    const socketOptions = { noDelay: true, keepAlive: true }
    const discovery = this.options.mdns
    const psk = this.options.membership?.psk
    const gate = (direction: 'inbound' | 'outbound') => (peerId: { toString(): string }, maConn: { remoteAddr: { toString(): string } }) =>
      !this.admits(peerId.toString(), { address: maConn.remoteAddr.toString(), direction })
    this.libp2p = await createLibp2p({
      ...(this.options.privateKey === undefined ? {} : { privateKey: this.options.privateKey }),
      addresses: { listen: [...(this.options.listen ?? [])] },
      transports: [tcp({ dialOpts: socketOptions, listenOpts: socketOptions })],
      ...(psk === undefined ? {} : { connectionProtector: preSharedKey({ psk }) }),
      connectionEncrypters: [withConnectionTuning(noise({ crypto: nodeNoiseCrypto }))],
      streamMuxers: [yamux({ enableKeepAlive: true })],
      connectionGater: {
        denyInboundEncryptedConnection: gate('inbound'),
        denyOutboundEncryptedConnection: gate('outbound'),
      },
      peerDiscovery:
        discovery === undefined
          ? []
          : [
              this.watchSelf(
                mdns({
                  broadcast: discovery.announce ?? true,
                  interval: discovery.queryIntervalMs ?? 10_000,
                  serviceTag: discovery.serviceTag ?? MDNS_SERVICE_TAG,
                }),
              ),
            ],
      // the connection monitor opens a ping stream per connection every 10 s; Yamux keepalive suffices here
      connectionMonitor: { enabled: false },
      connectionManager: {
        // a cluster dials all workers at once, possibly from one host: the default allows 5 per second per host
        inboundConnectionThreshold: 1000,
        maxIncomingPendingConnections: 100,
      },
    })
    const onPeerDiscovered = this.options.onPeerDiscovered
    if (onPeerDiscovered !== undefined) {
      this.libp2p.addEventListener('peer:discovery', (evt) => {
        const peer = evt.detail.id.toString()
        const addresses = evt.detail.multiaddrs.map((ma) => {
          const text = ma.toString()
          return text.includes('/p2p/') ? text : `${text}/p2p/${peer}`
        })
        log('discovered %s at %s', peer, addresses.join(', '))
        onPeerDiscovered({ peer, addresses })
      })
    }
    log('node %s started, listening on %s', this.peerId, this.multiaddrs().join(', '))
  }

  /**
   * Abort every open channel (remotes see a reset → PeerGoneError), then close connections and sockets.
   * Idempotent.
   */
  async stop(_options: AbortableOptions = {}): Promise<void> {
    const node = this.libp2p
    if (node === undefined) return
    this.libp2p = undefined
    const stopped = new ChannelClosedError(`transport node ${node.peerId.toString()} stopped`)
    for (const channel of this.channels) channel.abort(stopped)
    this.channels.clear()
    // libp2p's graceful stop can wait forever on a connection whose remote process exited mid-close (nothing is left
    // in the event loop to settle it), so it gets a bounded time; the sockets are gone either way.
    let timer: NodeJS.Timeout | undefined
    const timedOut = await Promise.race([
      Promise.resolve(node.stop()).then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), STOP_TIMEOUT_MS)
      }),
    ])
    clearTimeout(timer)
    log('node %s stopped%s', node.peerId.toString(), timedOut ? ` (gave up waiting after ${STOP_TIMEOUT_MS} ms)` : '')
  }

  /** Peer id string of this node. @throws NotStartedError when not started */
  get peerId(): string {
    return this.started().peerId.toString()
  }

  /** Full listen addresses with the `/p2p/<peer id>` suffix, e.g. `/ip4/127.0.0.1/tcp/40123/p2p/12D3KooW…`. */
  multiaddrs(): string[] {
    return this.started()
      .getMultiaddrs()
      .map((ma) => ma.toString())
  }

  /**
   * Accept inbound streams of `protocol` as framed channels.
   * @throws whatever libp2p throws if `protocol` is already handled
   */
  async handle(protocol: string, handler: ChannelHandler, options: AbortableOptions = {}): Promise<void> {
    await this.started().handle(
      protocol,
      (stream: Stream, connection: Connection) => {
        const peer = connection.remotePeer.toString()
        if (!this.admits(peer, { address: connection.remoteAddr.toString(), direction: 'inbound', protocol })) {
          stream.abort(new MembershipError(peer, `peer ${peer} is not a member: stream for ${protocol} refused`))
          return
        }
        batchWindowUpdates(stream)
        const channel = this.track(new FramedChannel(stream, connection, this.channelOptions))
        Promise.resolve()
          .then(() => handler(channel))
          .catch((err: unknown) => {
            log.error('handler for %s from %s failed - %e', protocol, channel.remotePeer, err)
            channel.abort(err instanceof Error ? err : new Error(String(err)))
          })
      },
      { ...(options.signal === undefined ? {} : { signal: options.signal }), maxInboundStreams: 256 },
    )
  }

  /** Stop accepting new streams of `protocol` (open channels stay open). */
  async unhandle(protocol: string, options: AbortableOptions = {}): Promise<void> {
    await this.started().unhandle(protocol, options.signal === undefined ? {} : { signal: options.signal })
  }

  /**
   * Open a framed channel to `address` for `protocol`, reusing an open connection to that peer if any (unless
   * `options.fresh`).
   *
   * @param address - multiaddr string, preferably with `/p2p/<peer id>` (then the remote's identity is verified)
   * @param options.signal - bounds the whole dial, together with the node's `dialTimeoutMs` (default 10 s)
   * @throws TypeError if `address` is not a multiaddr; MembershipError when the peer there is not in
   *   `membership.trustedPeers`; DuplicateIdentityError when the peer there has this node's own peer id (a copied
   *   key); DialError naming the address when the peer is unreachable, refuses, fails the handshake (a different
   *   pre-shared key, for one), does not handle `protocol`, or the signal fires first
   */
  async dial(address: string, protocol: string, options: DialOptions = {}): Promise<FramedChannel> {
    const node = this.started()
    let ma: ReturnType<typeof multiaddr>
    try {
      ma = multiaddr(address)
    } catch (err) {
      throw new TypeError(`cannot dial '${address}': not a multiaddr`, { cause: err })
    }
    const self = node.peerId.toString()
    const named = /\/p2p\/([^/]+)$/.exec(address)?.[1]
    if (named === self) throw duplicateSelf(self, address)
    if (named !== undefined && !this.admits(named, { address, direction: 'outbound' })) throw this.notMember(named, address)
    const timeout = AbortSignal.timeout(this.options.dialTimeoutMs ?? DEFAULT_DIAL_TIMEOUT_MS)
    const signal = options.signal === undefined ? timeout : AbortSignal.any([options.signal, timeout])
    try {
      signal.throwIfAborted()
      const connection = await node.dial(ma, { signal, ...(options.fresh ? { force: true } : {}) })
      const stream = await connection.newStream(protocol, { signal })
      batchWindowUpdates(stream)
      return this.track(new FramedChannel(stream, connection, this.channelOptions))
    } catch (err) {
      const name = (err as Error | undefined)?.name
      // the remote's id is known only after noise when the address has no /p2p/ part
      if (name === 'InvalidPeerIdError' && /dial self/i.test((err as Error).message)) throw duplicateSelf(self, address, err)
      const refused = this.refusedDials.get(addressKey(address))
      if (name === 'ConnectionInterceptedError' && refused !== undefined) throw this.notMember(refused, address, err)
      const reason = signal.aborted
        ? `aborted (${describeReason(signal.reason)})`
        : err instanceof Error
          ? `${err.name}: ${err.message}`
          : String(err)
      // a private network (pnet) garbles the noise handshake of a peer without the same key: say so
      const hint = name === 'EncryptionFailedError' ? ' (the handshake failed: do both sides use the same pre-shared key?)' : ''
      throw new DialError(address, `cannot dial ${address} for ${protocol}: ${reason}${hint}`, { cause: err })
    }
  }

  /**
   * True when `peer` may talk to this node (always, without `membership.trustedPeers`). A refusal is logged with the
   * peer id, reported to `membership.onRefused`, and remembered for `dial`'s error message.
   */
  private admits(peer: string, refusal: Omit<MembershipRefusal, 'peer'>): boolean {
    const trusted = this.options.membership?.trustedPeers
    if (trusted === undefined || trusted.has(peer)) return true
    if (refusal.direction === 'outbound') {
      if (this.refusedDials.size > 64) this.refusedDials.clear()
      this.refusedDials.set(addressKey(refusal.address), peer)
    }
    log(
      'refused non-member %s (%s %s%s)',
      peer,
      refusal.direction === 'inbound' ? 'from' : 'at',
      refusal.address,
      refusal.protocol === undefined ? '' : `, protocol ${refusal.protocol}`,
    )
    this.options.membership?.onRefused?.({ peer, ...refusal })
    return false
  }

  private notMember(peer: string, address: string, cause?: unknown): MembershipError {
    const source = this.options.membership?.trustSource ?? 'the trusted peer ids'
    return new MembershipError(peer, `refusing ${address}: peer ${peer} is not a member (not in ${source})`, cause === undefined ? {} : { cause })
  }

  /** Wraps an mDNS discovery factory to report answers carrying this node's own peer id (`onSelfDiscovered`). */
  private watchSelf<C>(factory: (components: C) => PeerDiscovery): (components: C) => PeerDiscovery {
    return (components) => {
      const discovery = factory(components)
      discovery.addEventListener('peer', (evt) => {
        const self = this.libp2p?.peerId
        if (self === undefined || !evt.detail.id.equals(self)) return
        const addresses = evt.detail.multiaddrs.map((ma) => ma.toString())
        log.error('another process announces this node\'s peer id %s at %s', self.toString(), addresses.join(', '))
        this.options.onSelfDiscovered?.(addresses)
      })
      return discovery
    }
  }

  private track(channel: FramedChannel): FramedChannel {
    this.channels.add(channel)
    channel.closed.then(
      () => this.channels.delete(channel),
      () => this.channels.delete(channel),
    )
    return channel
  }

  private started(): Libp2p {
    if (this.libp2p === undefined) throw new NotStartedError('transport node is not started: call start() first')
    return this.libp2p
  }
}

/** A dialled address without its `/p2p/<peer id>` suffix (as the gater sees the connection's remote address). */
function addressKey(address: string): string {
  return address.replace(/\/p2p\/[^/]+$/, '')
}

function duplicateSelf(peer: string, address: string, cause?: unknown): DuplicateIdentityError {
  // on one machine the usual cause is not a copy but two processes reading the same default key file
  const local = /^\/ip4\/127\.|^\/ip6\/::1\//.test(address) ? ' (on one machine: give each process its own key file)' : ''
  return new DuplicateIdentityError(
    peer,
    `peer ID ${peer} is used by two agents (this process and the one at ${address}): copy of an identity key?${local}`,
    cause === undefined ? {} : { cause },
  )
}

function describeReason(reason: unknown): string {
  return reason instanceof Error ? `${reason.name}: ${reason.message}` : String(reason)
}
