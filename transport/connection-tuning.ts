/**
 * Per-connection fixes of two per-message costs in the libp2p 3 stack, applied by wrapping the connection encrypter
 * (the one layer that sees both the raw TCP connection and the secured one). Bytes on the wire, their order and the
 * encryption are unchanged; both fixes are measured in `bench/allreduce.ts --diagnose`.
 *
 * 1. One socket write per libp2p send. @libp2p/tcp 11 writes each buffer of an outgoing `Uint8ArrayList` with its own
 *    `socket.write`; with TCP_NODELAY each is its own syscall and TCP segment, and one noise message is a list of
 *    ~5 buffers (length prefix, then one ciphertext piece per plaintext piece, then the tag). Measured: 42
 *    `socket.write` per 6-frame allreduce round; the receiver then ran the whole stack on each fragment. The TCP
 *    connection's `sendData` is replaced by a corked loop (`cork`, write all, `uncork` → one `writev`), and it reports
 *    backpressure by what Node really still holds: a single 32 KiB write exceeds the socket's 16 KiB high-water mark,
 *    so the stock code reported "full" on every tensor frame and waited for a 'drain' the kernel had long made moot.
 * 2. No stack trace per received noise message. Noise's length-prefix decoder learns that its buffer is empty by
 *    catching the `RangeError` its `uint16BEDecode` throws — a new Error with a captured stack (≈ 5–20 µs) at the end
 *    of every received batch. The secured connection's decoder gets a length decoder that throws one pre-built
 *    `RangeError` instead (same control flow, no allocation).
 */
import type { Socket } from 'node:net'
import type { ConnectionEncrypter, MessageStream, SecureConnectionOptions, SecuredConnection } from '@libp2p/interface'
import { serviceCapabilities } from '@libp2p/interface'
import type { Uint8ArrayList } from 'uint8arraylist'

/** The parts of @libp2p/tcp's connection (an `AbstractMultiaddrConnection` over a `net.Socket`) patch 1 uses. */
interface SocketConnection {
  readonly socket: Socket
  sendData(data: Uint8ArrayList): { sentBytes: number; canSendMore: boolean }
}

/** The part of @chainsafe/libp2p-noise 17's secured connection (`EncryptedMessageStream`) patch 2 uses. */
interface NoiseDecoderOwner {
  readonly decoder: { lengthDecoder: (data: { byteLength: number }) => number }
}

const patched = new WeakSet<object>()

function isSocketConnection(connection: unknown): connection is SocketConnection {
  const socket = (connection as { socket?: Partial<Socket> } | null)?.socket
  return (
    typeof (connection as { sendData?: unknown } | null)?.sendData === 'function' &&
    typeof socket?.cork === 'function' &&
    typeof socket.uncork === 'function' &&
    typeof socket.write === 'function'
  )
}

/**
 * Make a @libp2p/tcp connection write each `sendData` call as one corked batch (patch 1). No-op (returns false) for
 * any other connection, or one already patched.
 */
export function coalesceSocketWrites(connection: unknown): boolean {
  if (!isSocketConnection(connection) || patched.has(connection)) return false
  patched.add(connection)
  const socket = connection.socket
  connection.sendData = (data: Uint8ArrayList) => {
    socket.cork()
    for (const buf of data) socket.write(buf)
    socket.uncork() // one writev of everything above
    // Node keeps what the kernel did not take and emits 'drain' once it is flushed if it was over the high-water
    // mark: report "full" only then, so libp2p waits for a 'drain' that will come
    const canSendMore = socket.writableLength === 0 || !socket.writableNeedDrain
    return { sentBytes: data.byteLength, canSendMore }
  }
  return true
}

/** Thrown (never built again) when fewer than 2 bytes are buffered; noise's decoder catches any RangeError. */
const NEED_MORE_BYTES = new RangeError('Could not decode int16BE: fewer than 2 bytes buffered')

function isNoiseDecoderOwner(connection: unknown): connection is NoiseDecoderOwner {
  const decoder = (connection as { decoder?: { lengthDecoder?: unknown } } | null)?.decoder
  return typeof decoder?.lengthDecoder === 'function'
}

/**
 * Give a noise-secured connection a length decoder that signals "need more bytes" without building an Error
 * (patch 2). No-op (returns false) for any other connection, or one already patched.
 */
export function cheapNoiseLengthDecoding(connection: unknown): boolean {
  if (!isNoiseDecoderOwner(connection) || patched.has(connection)) return false
  patched.add(connection)
  const decoder = connection.decoder
  const original = decoder.lengthDecoder
  decoder.lengthDecoder = (data) => {
    if (data.byteLength < 2) throw NEED_MORE_BYTES
    return original(data)
  }
  return true
}

/**
 * Wrap a libp2p connection-encrypter factory (e.g. `noise(...)`) so that every connection it secures gets both
 * patches. The handshake and the encryption are the wrapped encrypter's, untouched.
 */
export function withConnectionTuning<Components>(
  factory: (components: Components) => ConnectionEncrypter,
): (components: Components) => ConnectionEncrypter {
  return (components) => {
    const inner = factory(components)
    const capabilities = (inner as { [serviceCapabilities]?: string[] })[serviceCapabilities] ?? []
    const tuned = (secured: SecuredConnection): SecuredConnection => {
      cheapNoiseLengthDecoding(secured.connection)
      return secured
    }
    return {
      protocol: inner.protocol,
      [Symbol.toStringTag]: `edgeshard:tuned(${inner.protocol})`,
      [serviceCapabilities]: capabilities,
      async secureOutbound(connection: MessageStream, options?: SecureConnectionOptions) {
        coalesceSocketWrites(connection)
        return tuned(await inner.secureOutbound(connection, options))
      },
      async secureInbound(connection: MessageStream, options?: SecureConnectionOptions) {
        coalesceSocketWrites(connection)
        return tuned(await inner.secureInbound(connection, options))
      },
    } as ConnectionEncrypter
  }
}
