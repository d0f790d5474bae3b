/** Typed errors of the agent (STYLE: `static name` and `this.name`; tests match on `.name`). */

/** onnxruntime refused a graph or failed while running it. */
export class RuntimeError extends Error {
  static override name = 'RuntimeError'
  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'RuntimeError'
  }
}

/** A peer broke the tensor-parallel protocol, reported an error, or went away during generation. */
export class PeerFailedError extends Error {
  static override name = 'PeerFailedError'
  /** Peer id of the failed peer. */
  readonly peer: string
  constructor(peer: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'PeerFailedError'
    this.peer = peer
  }
}

/** The command line asked for something that cannot be done (bad flag value, missing file). */
export class UsageError extends Error {
  static override name = 'UsageError'
  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'UsageError'
  }
}

/** Discovery found fewer agents than a cluster needs (none on the LAN, all busy, or fewer than asked for). */
export class DiscoveryError extends Error {
  static override name = 'DiscoveryError'
  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'DiscoveryError'
  }
}

/**
 * Split computing failed between a head and a tail peer: a malformed or unexpected frame, a model mismatch, or a
 * failure the other side reported (`remoteName` is the name of the error it raised there, e.g. `CutError`).
 */
export class SplitProtocolError extends Error {
  static override name = 'SplitProtocolError'
  /** Name of the error raised on the other peer, when it reported one. */
  readonly remoteName: string | undefined
  constructor(message: string, options?: ErrorOptions & { remoteName?: string }) {
    super(message, options)
    this.name = 'SplitProtocolError'
    this.remoteName = options?.remoteName
  }
}

/**
 * An identity key file cannot be used: readable by others than its owner (like ssh, the key is then refused), owned
 * by another user, not a libp2p private key, or not creatable.
 */
export class IdentityError extends Error {
  static override name = 'IdentityError'
  /** The key file. */
  readonly path: string
  constructor(path: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'IdentityError'
    this.path = path
  }
}

/** A trust file or pre-shared key file is unreadable or malformed (the message names the file and the line). */
export class MembershipConfigError extends Error {
  static override name = 'MembershipConfigError'
  /** The file. */
  readonly path: string
  constructor(path: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'MembershipConfigError'
    this.path = path
  }
}
