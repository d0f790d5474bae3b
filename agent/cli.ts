#!/usr/bin/env node
/**
 * The `edgeshard` command line. The only module that prints or exits.
 *
 * Exit codes: 0 success; 1 a failure while running (a peer went away, a runtime error); 2 bad input (a missing or
 * malformed model, a bad flag value, an impossible plan). Errors are one line on stderr; `DEBUG=edgeshard*` adds
 * the stack.
 */
import { closeSync, existsSync, openSync, writeFileSync, writeSync } from 'node:fs'
import { cpus, loadavg } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander'
import { loadModel, type ModelDescription } from '../splitter/index.ts'
import { Cluster } from './cluster.ts'
import { UsageError } from './errors.ts'
import { generate } from './generate.ts'
import { type LocalWorkers, spawnLocalWorkers } from './local-workers.ts'
import { readTokenizerBin } from './tokenizer/llama2c-tokenizer.ts'
import { SpmTokenizer } from './tokenizer/spm-tokenizer.ts'
import { WorkerAgent } from './worker.ts'

/** Where `npm start` finds its default model: ../shared/models beside the repository. */
const DEFAULT_MODEL = fileURLToPath(new URL('../../shared/models/stories260K.bin', import.meta.url))

/** Errors caused by the user's input: exit code 2. */
const INPUT_ERRORS = new Set(['ModelFormatError', 'TokenizerFormatError', 'UsageError', 'RangeError', 'DialError'])

function wholeNumber(min: number) {
  return (value: string): number => {
    const n = Number(value)
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`expected a whole number ≥ ${min}, got ${JSON.stringify(value)}`)
    return n
  }
}

function finiteNumber(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`expected a number, got ${JSON.stringify(value)}`)
  return n
}

/** Finds the tokenizer of a llama2.c checkpoint: `--tokenizer`, else tok<vocab>.bin or tokenizer.bin beside it. */
function tokenizerFor(model: ModelDescription, explicit?: string): SpmTokenizer {
  if (model.vocab && !explicit) return new SpmTokenizer(model.vocab, { source: model.path })
  const vocabSize = model.config.vocabSize
  const candidates = explicit ? [explicit] : [join(dirname(model.path), `tok${vocabSize}.bin`), join(dirname(model.path), 'tokenizer.bin')]
  const path = candidates.find((p) => existsSync(p))
  if (!path) {
    throw new UsageError(`no tokenizer for ${model.path}: looked for ${candidates.join(' and ')}; pass --tokenizer PATH (a llama2.c tokenizer.bin)`)
  }
  return new SpmTokenizer(readTokenizerBin(path, vocabSize), { source: path })
}

interface RunFlags {
  model?: string
  tokenizer?: string
  prompt: string
  peers?: number
  workers?: string
  maxTokens: number
  temperature: number
  topP: number
  seed?: number
  threads?: number
  dumpLogits?: string
  summaryJson?: string
  context?: number
  quiet?: boolean
}

async function run(flags: RunFlags): Promise<void> {
  const modelPath = flags.model ?? DEFAULT_MODEL
  if (!flags.model && !existsSync(modelPath)) {
    throw new UsageError(`no --model given and the default ${modelPath} does not exist; pass --model PATH (a llama2.c .bin checkpoint or a .gguf file)`)
  }
  if (flags.peers !== undefined && flags.workers !== undefined) throw new UsageError('give either --peers N (local workers) or --workers ADDR,... (running agents), not both')
  const loaded = loadModel(modelPath)
  // --context overrides the context length the file declares (llama.cpp's -c), e.g. stories260K.gguf says 128.
  const model: ModelDescription =
    flags.context === undefined ? loaded : { ...loaded, config: { ...loaded.config, maxSeqLen: flags.context } }
  const tokenizer = tokenizerFor(model, flags.tokenizer)
  const workerAddrs = flags.workers?.split(',').map((a) => a.trim()).filter((a) => a.length > 0)
  const nPeers = workerAddrs ? workerAddrs.length + 1 : (flags.peers ?? 3)
  // Check the plan before any process starts or socket opens (throws RangeError naming the numbers).
  const { planTensorParallel } = await import('../splitter/index.ts')
  planTensorParallel(model.config, nPeers)
  const status = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`${line}\n`)
  }

  const localThreads = Math.max(1, Math.floor(cpus().length / (workerAddrs ? 1 : nPeers)))
  const threads = flags.threads ?? localThreads
  let local: LocalWorkers | null = null
  let cluster: Cluster | null = null
  const logitsFd = flags.dumpLogits ? openSync(flags.dumpLogits, 'w') : null
  try {
    let addresses: readonly string[] = workerAddrs ?? []
    if (!workerAddrs && nPeers > 1) {
      status(`edgeshard: starting ${nPeers - 1} local worker${nPeers > 2 ? 's' : ''}`)
      local = await spawnLocalWorkers(nPeers - 1)
      addresses = local.addresses
    }
    const loadStart = performance.now()
    cluster = await Cluster.start(model, {
      workers: addresses,
      threads,
      onWorkerReady: (index, peer) => {
        const pid = local?.processes[index - 1]?.pid
        status(`edgeshard: worker ${index} ready: peer ${peer} at ${addresses[index - 1]}${pid ? ` (pid ${pid})` : ''}`)
      },
    })
    status(
      `edgeshard: ${model.path} on ${nPeers} peer${nPeers > 1 ? 's' : ''} (tensor parallel: ${cluster.plan.shards
        .map((s) => `${s.kvHeads.count}kv/${s.ffnColumns.count}ffn`)
        .join(' ')}), loaded in ${(performance.now() - loadStart).toFixed(0)} ms`,
    )
    const wireBytesBefore = cluster.wireBytes
    const result = await generate(cluster, tokenizer, flags.prompt, {
      maxTokens: flags.maxTokens,
      temperature: flags.temperature,
      topP: flags.topP,
      seed: flags.seed ?? Date.now(),
      onText: (bytes) => process.stdout.write(bytes),
      ...(logitsFd !== null
        ? { onLogits: (_pos: number, logits: Float32Array) => void writeSync(logitsFd, logits) }
        : {}),
    })
    process.stdout.write('\n')
    const c = cluster.counters
    const forwards = result.generated
    const wireBytesPerToken = (cluster.wireBytes - wireBytesBefore) / Math.max(1, forwards)
    const summary = {
      model: model.path,
      peers: nPeers,
      plan: cluster.plan.shards,
      promptTokens: result.promptTokens,
      nextTokens: result.nextTokens,
      generated: result.generated,
      ttftMs: result.ttftMs,
      msPerToken: result.msPerToken,
      wireBytesPerToken,
      allreducesPerToken: c.allreduces / Math.max(1, forwards),
      computeMs: c.timings.computeMs,
      allreduceWaitMs: c.timings.allreduceMs,
      loadAverage: loadavg()[0],
    }
    if (flags.summaryJson) writeFileSync(flags.summaryJson, `${JSON.stringify(summary, null, 2)}\n`)
    status(
      `edgeshard: ${result.generated} tokens, TTFT ${result.ttftMs.toFixed(1)} ms, ${result.msPerToken.toFixed(2)} ms/token, ` +
        `${Math.round(wireBytesPerToken)} bytes/token on the wire, ${nPeers} peers, load ${loadavg()[0]!.toFixed(2)}`,
    )
  } finally {
    if (logitsFd !== null) closeSync(logitsFd)
    await cluster?.stop().catch(() => {})
    await local?.stop()
  }
}

async function agent(flags: { listen: string[]; exitWithParent?: boolean }): Promise<void> {
  let ending = false
  const worker = new WorkerAgent({
    listen: flags.listen,
    onSessionEnd: (peer, error) => {
      if (error) process.stderr.write(`edgeshard agent: session with master ${peer} ended: ${error.message}\n`)
      if (flags.exitWithParent) void shutdown(error ? 1 : 0)
    },
  })
  const shutdown = async (code: number): Promise<void> => {
    if (ending) return
    ending = true
    await worker.stop().catch(() => {})
    process.exit(code)
  }
  process.on('SIGTERM', () => void shutdown(0))
  process.on('SIGINT', () => void shutdown(0))
  if (flags.exitWithParent) {
    // The parent holds our stdin: when it dies (even by SIGKILL) the pipe closes and we go too.
    process.stdin.on('end', () => void shutdown(0))
    process.stdin.on('close', () => void shutdown(0))
    process.stdin.resume()
  }
  await worker.start()
  for (const addr of worker.multiaddrs()) process.stdout.write(`listening ${addr}\n`)
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), ...value.split(',').filter((v) => v.length > 0)]
}

const program = new Command('edgeshard')
  .description('Run one model across several small devices: tensor-parallel inference over libp2p')
  .showHelpAfterError()
  .exitOverride()

program
  .command('run')
  .description('generate text with the model split across this device and its peers (this device is the master)')
  .option('--model <path>', 'llama2.c checkpoint (.bin) or GGUF file (default: ../shared/models/stories260K.bin)')
  .option('--tokenizer <path>', 'llama2.c tokenizer.bin (default: tok<vocab>.bin or tokenizer.bin beside a .bin model)')
  .option('--prompt <text>', 'prompt text', 'Once upon a time')
  .addOption(new Option('--peers <n>', 'peers on this machine, the master included (spawns n-1 workers; default 3)').argParser(wholeNumber(1)))
  .option('--workers <addrs>', 'comma-separated multiaddrs of running `edgeshard agent`s to use instead of local workers')
  .addOption(new Option('--max-tokens <k>', 'new tokens to generate at most').argParser(wholeNumber(1)).default(256))
  .addOption(new Option('--temperature <t>', '0 = greedy').argParser(finiteNumber).default(0))
  .addOption(new Option('--top-p <p>', 'nucleus sampling threshold').argParser(finiteNumber).default(0.9))
  .addOption(new Option('--seed <s>', 'sampling seed (default: the clock)').argParser(wholeNumber(1)))
  .addOption(new Option('--context <n>', 'context length in positions (default: what the model file declares)').argParser(wholeNumber(1)))
  .addOption(new Option('--threads <n>', 'onnxruntime threads per peer (default: cores / local peers)').argParser(wholeNumber(1)))
  .option('--dump-logits <file>', 'write the logits of every position as raw f32 [positions, vocab]')
  .option('--summary-json <file>', 'write the run summary (tokens, timings, bytes) as JSON')
  .option('--quiet', 'no status lines on stderr, only the text')
  .action(run)

program
  .command('agent')
  .description('run a worker agent: print its multiaddr, accept a shard from a master and serve it')
  .option('--listen <addr>', 'multiaddr to listen on (repeatable, comma-separated)', collect)
  .option('--exit-with-parent', 'exit when the master session ends or stdin closes (used for local workers)')
  .action((flags: { listen?: string[]; exitWithParent?: boolean }) =>
    agent({ listen: flags.listen ?? ['/ip4/0.0.0.0/tcp/0'], ...(flags.exitWithParent ? { exitWithParent: true } : {}) }),
  )

try {
  await program.parseAsync(process.argv)
  // `agent` keeps serving; `run` is done: do not wait for sockets and native threads to wind down.
  if (program.args[0] !== 'agent') process.exit(0)
} catch (err) {
  if (err instanceof CommanderError) {
    // commander has printed the problem and the usage already
    process.exit(err.exitCode === 0 ? 0 : 2)
  }
  const e = err as Error
  const debug = /(^|,)edgeshard/.test(process.env.DEBUG ?? '')
  process.stderr.write(`edgeshard: ${e.message}\n${debug && e.stack ? `${e.stack}\n` : ''}`)
  process.exit(INPUT_ERRORS.has(e.name) ? 2 : 1)
}
