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
