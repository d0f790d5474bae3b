/**
 * Progress of a cluster's start for `run` and `serve`, on stderr: two cli-progress bars on a terminal (shards sent to
 * the workers, layer by layer; peers that loaded their shard), plain status lines otherwise, nothing with `quiet`.
 */
import cliProgress from 'cli-progress'

/** Sink for the events of `Cluster.start` plus free-form status lines. */
export interface ClusterProgress {
  /** A status line (printed above the bars on a terminal). */
  line(text: string): void
  /** Layer `layer` (0-based) of `layers` has been cut and sent to every worker. */
  layerDistributed(layer: number, layers: number): void
  /** Worker `index` loaded its shard; `describe` is its status line. */
  workerReady(describe: string): void
  /** The whole cluster is up: removes the bars. */
  done(): void
}

/** A progress reporter for a cluster of `peers` peers (the master included). */
export function createClusterProgress(peers: number, options: { quiet?: boolean } = {}): ClusterProgress {
  const stream = process.stderr
  if (options.quiet === true) return { line: () => {}, layerDistributed: () => {}, workerReady: () => {}, done: () => {} }
  if (!stream.isTTY) {
    return {
      line: (text) => stream.write(`edgeshard: ${text}\n`),
      layerDistributed: () => {},
      workerReady: (describe) => stream.write(`edgeshard: ${describe}\n`),
      done: () => {},
    }
  }
  const bars = new cliProgress.MultiBar(
    { stream, format: 'edgeshard: {label} [{bar}] {value}/{total} {unit}', hideCursor: true, clearOnComplete: true, autopadding: true },
    cliProgress.Presets.shades_classic,
  )
  let distribute: cliProgress.SingleBar | null = null
  let loaded: cliProgress.SingleBar | null = null
  let ready = 0
  const loadBar = (): cliProgress.SingleBar => {
    loaded ??= bars.create(peers, 0, { label: 'loading shards  ', unit: 'peers' })
    return loaded
  }
  return {
    line: (text) => bars.log(`edgeshard: ${text}\n`),
    layerDistributed(layer, layers) {
      distribute ??= bars.create(layers, 0, { label: 'sending shards  ', unit: 'layers' })
      distribute.update(layer + 1)
      if (layer + 1 === layers) loadBar()
    },
    workerReady(describe) {
      bars.log(`edgeshard: ${describe}\n`)
      loadBar().update(++ready)
    },
    done() {
      loadBar().update(peers)
      bars.update() // flushes the lines logged since the last redraw
      bars.stop()
    },
  }
}
