/**
 * Fewer yamux window updates: one per half window consumed instead of one per data frame received.
 *
 * @chainsafe/libp2p-yamux 8 answers every data frame it receives with a window-update frame (its
 * `sendWindowUpdate` only skips the update when nothing has been consumed). For an allreduce that is one extra
 * encrypted message, socket write and receiver wake-up per tensor frame in each direction — as many as the tensor
 * frames themselves. Go's yamux (hashicorp/yamux `stream.sendWindowUpdate`) sends an update only once the consumed,
 * not yet re-granted bytes reach half the maximum window; this applies the same rule to a js yamux stream. The
 * sender may use its whole window before it blocks, so an update always arrives before it runs dry: flow control
 * and its backpressure are unchanged, only the granting is batched. State-changing updates (SYN/ACK flags, resuming a
 * paused stream) still go out at once because they run the original method.
 */

/** The fields of a @chainsafe/libp2p-yamux 8 `YamuxStream` this patch reads (all public class fields). */
interface YamuxStreamWindow {
  state: number
  recvWindow: number
  recvWindowCapacity: number
  sendWindowUpdate(): void
}

/** `StreamState.Established` of @chainsafe/libp2p-yamux 8 (enum: Init 0, SYNSent 1, SYNReceived 2, Established 3). */
const ESTABLISHED = 3

const patched = new WeakSet<object>()

function isYamuxStream(stream: unknown): stream is YamuxStreamWindow {
  const s = stream as Partial<YamuxStreamWindow> | null
  return (
    typeof s?.sendWindowUpdate === 'function' &&
    typeof s.state === 'number' &&
    typeof s.recvWindow === 'number' &&
    typeof s.recvWindowCapacity === 'number'
  )
}

/**
 * Make a yamux stream grant receive window in batches of at least half its window. No-op (returns false) for a
 * stream that is not a js yamux stream, or already patched.
 */
export function batchWindowUpdates(stream: unknown): boolean {
  if (!isYamuxStream(stream) || patched.has(stream)) return false
  patched.add(stream)
  const original = stream.sendWindowUpdate
  stream.sendWindowUpdate = function (this: YamuxStreamWindow): void {
    // an established stream with more than half its window still granted needs no update yet
    if (this.state === ESTABLISHED && this.recvWindowCapacity * 2 > this.recvWindow) return
    original.call(this)
  }
  return true
}
