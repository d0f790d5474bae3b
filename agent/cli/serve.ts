/**
 * `edgeshard serve`: starts a cluster like `run` and answers the OpenAI API (`/v1/models`, `/v1/completions`,
 * `/v1/chat/completions`) over HTTP until SIGINT/SIGTERM. Prints `listening http://HOST:PORT` on stdout once ready.
 * Before each request, agents it was started with that it lacks (lost, then back at the same address) and, with
 * `--discover`/`--bootstrap`, idle agents found since are admitted and the cluster re-planned (see rejoin.ts).
 */
import { type Command, Option } from 'commander'
import { UsageError } from '../errors.ts'
import type { AdmitReport } from '../cluster.ts'
import { DiscoveryWatch, Rejoiner } from '../rejoin.ts'
import { ClusterEngine, OpenAiServer } from '../server/index.ts'
import { wholeNumber } from './arguments.ts'
import { addClusterOptions, type ClusterFlags, startCluster } from './start-cluster.ts'

interface ServeFlags extends ClusterFlags {
  port: number
  host: string
  modelName?: string
}

async function serve(flags: ServeFlags): Promise<void> {
  const started = await startCluster(flags)
  const { status } = started
  // Agents found by --discover/--bootstrap keep being looked for: a new one joins at the next request.
  const discover = flags.discover !== undefined || (flags.bootstrap?.length ?? 0) > 0
  const watch = discover
    ? new DiscoveryWatch({ ...(flags.bootstrap ? { bootstrap: flags.bootstrap } : {}), mdns: flags.discover !== undefined, transport: started.transport })
    : null
  await watch?.start()
  const rejoiner = new Rejoiner(started.cluster, { addresses: started.workerAddresses, ...(watch ? { discovery: watch } : {}) })
  const engine = new ClusterEngine(started.cluster, started.tokenizer, {
    ...(flags.modelName ? { modelId: flags.modelName } : {}),
    beforeGenerate: async (signal) => {
      const report = await rejoiner.beforeRequest({ signal })
      if (report && (report.admitted.length > 0 || report.dropped.length > 0)) status(describeAdmission(report))
    },
  })
  const server = new OpenAiServer({
    engine,
    host: flags.host,
    port: flags.port,
    onRequestDone: (r) =>
      status(
        `${r.method} ${r.path} ${r.status} ${r.outcome}` +
          `${r.promptTokens !== undefined ? `, ${r.promptTokens} prompt + ${r.completionTokens ?? 0} completion tokens` : ''}, ${r.durationMs.toFixed(0)} ms` +
          `${r.peers !== undefined ? `, ${r.peers} peer${r.peers === 1 ? '' : 's'}` : ''}`,
      ),
    onFailure: (error) => status(`the cluster failed, answering 503 from now on: ${error.message}`),
  })
  try {
    await server.start()
  } catch (err) {
    await watch?.stop()
    await started.stop()
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'EADDRINUSE' || code === 'EADDRNOTAVAIL' || code === 'EACCES') {
      throw new UsageError(`cannot listen on ${flags.host}:${flags.port}: ${(err as Error).message}`, { cause: err })
    }
    throw err
  }
  process.stdout.write(`listening ${server.url}\n`)
  status(`serving model '${engine.modelId}' (context ${engine.contextLength}): OpenAI API at ${server.url}/v1`)
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve)
    process.once('SIGTERM', resolve)
  })
  status('stopping')
  await server.stop()
  await watch?.stop()
  await started.stop()
}

/**
 * The status line after workers joined before a request, e.g. `worker 2 (peer 12D3… at /ip4/…) joined: 3 peers, the
 * starting plan again (every device of the starting plan is back), installed in 85 ms`.
 */
export function describeAdmission(r: AdmitReport): string {
  const joined = r.admitted.map((w) => `worker ${w.device} (peer ${w.peer} at ${w.address})`).join(', ')
  const dropped = r.dropped.length > 0 ? `${joined ? '; ' : ''}worker${r.dropped.length > 1 ? 's' : ''} ${r.dropped.join(', ')} left out (lost)` : ''
  const plan =
    r.plan === undefined
      ? ''
      : r.plan.by === 'initial'
        ? `, the starting plan again (${r.plan.why})`
        : r.plan.by === 'planner'
          ? `, re-planned by the planner (${r.plan.why})`
          : `, re-planned with an even split (${r.plan.why})`
  return `${joined}${joined ? ' joined' : ''}${dropped}: ${r.peers} peer${r.peers === 1 ? '' : 's'}${plan}, installed in ${r.totalMs.toFixed(0)} ms`
}

/** Registers `edgeshard serve` on `program`. */
export function registerServe(program: Command): void {
  const command = program
    .command('serve')
    .description('start a cluster and serve the model over an OpenAI-compatible HTTP API (this device is the master)')
    .addOption(new Option('--port <n>', 'TCP port (0: any free port)').argParser(wholeNumber(0)).default(8080))
    .option('--host <addr>', 'interface to listen on (0.0.0.0: every interface; the API has no authentication)', '127.0.0.1')
    .option('--model-name <id>', 'model id clients pass as `model` (default: the model file name without extension)')
  addClusterOptions(command).action(serve)
}
