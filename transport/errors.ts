/**
 * Typed errors of the transport layer. Match on `.name` (not `instanceof`): errors cross module copies and workers.
 * Pattern from js-libp2p `interface/src/errors.ts`: each class has a static `name` and sets `this.name`.
 */

/** Bytes on the wire do not form a valid frame: over a size cap, truncated, malformed msgpack header, bad shape. */
export class FrameError extends Error {
  static override name = 'FrameError'

  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'FrameError'
  }
}

/**
 * The remote peer went away: it reset the stream, its connection died, or it ended the stream without the
 * channel's close handshake (e.g. its node stopped). The message names the peer id.
 */
export class PeerGoneError extends Error {
  static override name = 'PeerGoneError'
  /** Peer id string of the peer that went away. */
  readonly peer: string

  constructor(peer: string, message = `peer ${peer} is gone`, options?: ErrorOptions) {
    super(message, options)
    this.name = 'PeerGoneError'
    this.peer = peer
  }
}

/**
 * A peer is connected but silent: it sent nothing it owed within a deadline (e.g. its allreduce partial); a stopped
 * (SIGSTOP) or overloaded device. The message names the peer id and the deadline.
 */
export class PeerStalledError extends Error {
  static override name = 'PeerStalledError'
  /** Peer id string of the silent peer. */
  readonly peer: string

  constructor(peer: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'PeerStalledError'
    this.peer = peer
  }
}

/** Opening a connection or a protocol stream to an address failed (unreachable, refused, timed out, aborted). */
export class DialError extends Error {
  static override name = 'DialError'
  /** The multiaddr that was dialled. */
  readonly address: string

  constructor(address: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'DialError'
    this.address = address
  }
}

/** An allreduce could not complete: mismatched partial lengths, duplicate partials, misuse of tags. */
export class AllreduceError extends Error {
  static override name = 'AllreduceError'

  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'AllreduceError'
  }
}

/** The channel (or the node owning it) was closed locally; nothing more can be sent or received on it. */
export class ChannelClosedError extends Error {
  static override name = 'ChannelClosedError'

  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'ChannelClosedError'
  }
}

/** A `TransportNode` method was called before `start()` or after `stop()`. */
export class NotStartedError extends Error {
  static override name = 'NotStartedError'

  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'NotStartedError'
  }
}

/**
 * A bottleneck payload (`bottleneck-codec.ts`) is corrupt or not one: bad magic or version, checksum mismatch, body
 * that does not decompress, unknown element type or quantization, lengths that do not add up.
 */
export class CodecError extends Error {
  static override name = 'CodecError'

  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'CodecError'
  }
}

/**
 * A peer is not a member of this cluster: not in the trusted peer ids (a trust file) this node was given. Raised when
 * dialling a non-member; inbound non-members are refused without an error object reaching the caller (see
 * `MembershipOptions.onRefused`).
 */
export class MembershipError extends Error {
  static override name = 'MembershipError'
  /** Peer id string of the refused peer. */
  readonly peer: string

  constructor(peer: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'MembershipError'
    this.peer = peer
  }
}

/**
 * Two processes hold the same libp2p identity (a copied key file): this node dialled its own peer id, or two agents
 * reached at different addresses answered as one peer id.
 */
export class DuplicateIdentityError extends Error {
  static override name = 'DuplicateIdentityError'
  /** The peer id used twice. */
  readonly peer: string

  constructor(peer: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'DuplicateIdentityError'
    this.peer = peer
  }
}
