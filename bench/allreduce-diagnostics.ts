/**
 * libp2p node variants for `bench/allreduce.ts --diagnose`, to locate where allreduce time goes. Measurement only:
 * edgeshard itself always runs `TransportNode` (noise with real encryption). Imports transport internals on purpose.
 *
 * - `libp2p-stock`: TCP + @chainsafe/libp2p-noise with its default crypto + yamux, stock behaviour — the
 *   configuration edgeshard used before its data-path work.
 * - `libp2p-stock-crypto`: edgeshard's node (connection tuning, batched yamux window updates) but noise's
 *   default crypto: the gain of `nodeNoiseCrypto`.
 * - `libp2p-no-window-batching`: edgeshard's node without batched window updates.
 * - `libp2p-null-cipher`: edgeshard's node with a noise crypto whose AEAD is the identity plus a zero tag (NOT
 *   secure): what encryption costs.
 */
import { type ICryptoInterface, noise, pureJsCrypto } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import type { Connection, Libp2p, Stream } from '@libp2p/interface'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { Uint8ArrayList } from 'uint8arraylist'
import { withConnectionTuning } from '../transport/connection-tuning.ts'
import { FramedChannel } from '../transport/index.ts'
import { nodeNoiseCrypto } from '../transport/noise-crypto.ts'
import { batchWindowUpdates } from '../transport/yamux-window.ts'

const VARIANTS = ['libp2p-stock', 'libp2p-stock-crypto', 'libp2p-no-window-batching', 'libp2p-null-cipher'] as const
export type DiagnosticVariant = (typeof VARIANTS)[number]

export function isDiagnosticVariant(path: string): path is DiagnosticVariant {
  return (VARIANTS as readonly string[]).includes(path)
}

const TAG_BYTES = 16

/** Identity "AEAD" with an all-zero tag: same framing and sizes as ChaCha20-Poly1305, no protection at all. */
const nullCipher: ICryptoInterface = {
  ...pureJsCrypto,
  chaCha20Poly1305Encrypt(plaintext) {
    const out = new Uint8Array(plaintext.byteLength + TAG_BYTES)
    out.set(plaintext instanceof Uint8Array ? plaintext : plaintext.subarray())
    return out
  },
  chaCha20Poly1305Decrypt(ciphertext) {
    const bytes = ciphertext instanceof Uint8ArrayList ? ciphertext.subarray() : ciphertext
    return bytes.subarray(0, bytes.byteLength - TAG_BYTES)
  },
}

export function diagnosticNode(
  variant: DiagnosticVariant,
  listen: string[],
): {
  start(): Promise<void>
  stop(): Promise<void>
  multiaddrs(): string[]
  handle(protocol: string, handler: (channel: FramedChannel) => void | Promise<void>): Promise<void>
  dial(address: string, protocol: string, options?: { signal?: AbortSignal }): Promise<FramedChannel>
} {
  let node: Libp2p | undefined
  const stock = variant === 'libp2p-stock'
  const crypto = variant === 'libp2p-null-cipher' ? nullCipher : variant === 'libp2p-stock-crypto' || stock ? undefined : nodeNoiseCrypto
  const encrypter = noise(crypto === undefined ? {} : { crypto })
  const batch = (stream: Stream): void => {
    if (!stock && variant !== 'libp2p-no-window-batching') batchWindowUpdates(stream)
  }
  const started = (): Libp2p => {
    if (node === undefined) throw new Error('not started')
    return node
  }
  return {
    async start() {
      const socketOptions = { noDelay: true, keepAlive: true }
      node = await createLibp2p({
        addresses: { listen },
        transports: [tcp({ dialOpts: socketOptions, listenOpts: socketOptions })],
        connectionEncrypters: [stock ? encrypter : withConnectionTuning(encrypter)],
        streamMuxers: [yamux({ enableKeepAlive: true })],
        connectionMonitor: { enabled: false },
      })
    },
    async stop() {
      await node?.stop()
    },
    multiaddrs() {
      return started()
        .getMultiaddrs()
        .map((ma) => ma.toString())
    },
    async handle(protocol, handler) {
      await started().handle(protocol, (stream: Stream, connection: Connection) => {
        batch(stream)
        void handler(new FramedChannel(stream, connection))
      })
    },
    async dial(address, protocol, options = {}) {
      const connection = await started().dial(multiaddr(address), options)
      const stream = await connection.newStream(protocol, options)
      batch(stream)
      return new FramedChannel(stream, connection)
    },
  }
}
