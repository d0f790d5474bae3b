/**
 * Progress of a long file write for the CLI: a cli-progress bar on a terminal (stderr), plain lines at each 10 %
 * (at most one a second) otherwise, nothing with `quiet`.
 */
import cliProgress from 'cli-progress'

/** A progress sink: `update` with bytes done / total and what is being written, `stop` when done or failed. */
export interface Progress {
  update(doneBytes: number, totalBytes: number, item: string): void
  stop(): void
}

/** A progress reporter for `label` (e.g. `quantize out.gguf`), writing to stderr. */
export function createProgress(label: string, options: { quiet?: boolean } = {}): Progress {
  if (options.quiet === true) return { update: () => {}, stop: () => {} }
  const stream = process.stderr
  if (stream.isTTY) {
    const bar = new cliProgress.SingleBar(
      {
        stream,
        format: `edgeshard: ${label} [{bar}] {percentage}% {done}/{total} MB, eta {eta_formatted} {item}`,
        hideCursor: true,
        clearOnComplete: false,
        etaBuffer: 50,
      },
      cliProgress.Presets.shades_classic,
    )
    let started = false
    return {
      update(doneBytes, totalBytes, item) {
        const payload = { done: mb(doneBytes), total: mb(totalBytes), item }
        if (!started) {
          bar.start(totalBytes, doneBytes, payload)
          started = true
        } else {
          bar.update(doneBytes, payload)
        }
      },
      stop() {
        if (started) bar.stop()
      },
    }
  }
  // Plain lines: at each further 10 %, at most one a second (a write that takes under a second prints none).
  let nextTenth = 1
  const startMs = performance.now()
  let lastMs = startMs
  return {
    update(doneBytes, totalBytes, item) {
      if (totalBytes <= 0 || doneBytes < (nextTenth * totalBytes) / 10) return
      const tenth = Math.floor((doneBytes * 10) / totalBytes)
      nextTenth = tenth + 1
      const now = performance.now()
      if (now - lastMs < 1000) return
      lastMs = now
      const seconds = ((now - startMs) / 1000).toFixed(1)
      stream.write(`edgeshard: ${label}: ${tenth * 10}% (${mb(doneBytes)}/${mb(totalBytes)} MB, ${seconds} s, ${item})\n`)
    },
    stop() {},
  }
}

function mb(bytes: number): string {
  return (bytes / 1e6).toFixed(1)
}
