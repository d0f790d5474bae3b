/**
 * First come, first served: one generation at a time on the cluster (its KV caches hold one sequence).
 */

/**
 * Runs jobs one after another in the order `run` was called. A job whose signal aborts while it waits leaves the line
 * at once (rejecting with the signal's reason) without letting the jobs behind it overtake the one running.
 */
export class GenerationQueue {
  #tail: Promise<void> = Promise.resolve()
  #waiting = 0

  /** Jobs waiting or running. */
  get length(): number {
    return this.#waiting
  }

  /** Waits for every earlier job to settle, then runs `job`. @throws the signal's reason if it aborts first. */
  async run<T>(job: () => Promise<T>, options: { signal?: AbortSignal } = {}): Promise<T> {
    const previous = this.#tail
    let release: () => void = () => {}
    const mine = new Promise<void>((resolve) => {
      release = resolve
    })
    this.#tail = mine
    this.#waiting++
    try {
      await untilAborted(previous, options.signal)
      options.signal?.throwIfAborted()
      return await job()
    } finally {
      this.#waiting--
      // Hand the turn on only once everything before this job is done, even when this job left the line early.
      void previous.then(release)
    }
  }
}

function untilAborted(promise: Promise<void>, signal: AbortSignal | undefined): Promise<void> {
  if (signal === undefined) return promise
  return new Promise<void>((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason)
    const onAbort = (): void => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    void promise.then(() => {
      signal.removeEventListener('abort', onAbort)
      resolve()
    })
  })
}
