/**
 * `edgeshard serve`: starts a cluster like `run` and answers the OpenAI API (`/v1/models`, `/v1/completions`,
 * `/v1/chat/completions`) over HTTP until SIGINT/SIGTERM. Prints `listening http://HOST:PORT` on stdout once ready.
 */
import { type Command, Option } from 'commander'
import { UsageError } from '../errors.ts'
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
  const engine = new ClusterEngine(started.cluster, started.tokenizer, flags.modelName ? { modelId: flags.modelName } : {})
  const server = new OpenAiServer({
    engine,
    host: flags.host,
    port: flags.port,
    onRequestDone: (r) =>
      status(
        `${r.method} ${r.path} ${r.status} ${r.outcome}` +
          `${r.promptTokens !== undefined ? `, ${r.promptTokens} prompt + ${r.completionTokens ?? 0} completion tokens` : ''}, ${r.durationMs.toFixed(0)} ms`,
      ),
    onFailure: (error) => status(`the cluster failed, answering 503 from now on: ${error.message}`),
  })
  try {
    await server.start()
  } catch (err) {
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
  await started.stop()
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
