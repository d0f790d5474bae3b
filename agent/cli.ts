#!/usr/bin/env node
/**
 * The `edgeshard` command line. The only module that prints or exits.
 *
 * Exit codes: 0 success; 1 a failure while running (a peer went away, a runtime error); 2 bad input (a missing or
 * malformed model, a bad flag value, an impossible plan). Errors are one line on stderr; `DEBUG=edgeshard*` adds
 * the stack.
 */
import { closeSync, openSync, writeFileSync, writeSync } from 'node:fs'
import { loadavg } from 'node:os'
import { Command, CommanderError, Option } from 'commander'
import { byteSize, collect, finiteNumber, wholeNumber } from './cli/arguments.ts'
import { registerPeers } from './cli/peers.ts'
import { registerPlan } from './cli/plan.ts'
import { measureAndPublish, publishDeviceProfile, registerProfile } from './cli/profile.ts'
import { registerQuantize } from './cli/quantize.ts'
import { registerReport } from './cli/report.ts'
import { registerServe } from './cli/serve.ts'
import { registerSplit } from './cli/split.ts'
import { addSecurityOptions, describeRefusal, loadSecurity, registerIdentity, type SecurityFlags } from './cli/security.ts'
import { registerEmulate } from './cli/emulate.ts'
import { addClusterOptions, type ClusterFlags, type ClusterSetup, startCluster } from './cli/start-cluster.ts'
import { registerSynth } from './cli/synth.ts'
import { generate } from './generate.ts'
import { WorkerAgent } from './worker.ts'

/** Errors caused by the user's input: exit code 2. */
const INPUT_ERRORS = new Set([
  'ModelFormatError',
  'TokenizerFormatError',
  'UsageError',
  'RangeError',
  'DialError',
  'MemoryBudgetError',
  // cluster files and cluster plans
  'ClusterFileError',
  'InsufficientMemoryError',
  // identity and membership: a bad key or trust file, a non-member worker, a copied identity key
  'IdentityError',
  'MembershipConfigError',
  'MembershipError',
  'DuplicateIdentityError',
])

interface RunFlags extends ClusterFlags {
  prompt: string
  maxTokens: number
  temperature: number
  topP: number
  seed?: number
  dumpLogits?: string
  summaryJson?: string
}

async function run(flags: RunFlags, setup: ClusterSetup = {}): Promise<void> {
  const started = await startCluster(flags, setup)
  const { cluster, model, tokenizer, peers: nPeers, status } = started
  const logitsFd = flags.dumpLogits ? openSync(flags.dumpLogits, 'w') : null
  try {
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
    if (result.stopReason === 'context' && result.generated < flags.maxTokens) {
      // Not a status line: the text was cut short of what was asked, which --quiet must not hide.
      const ctx = cluster.plan.model.maxSeqLen
      process.stderr.write(
        `edgeshard: stopped after ${result.generated} of ${flags.maxTokens} tokens: the context of ${ctx} positions is full ` +
          `(${flags.context === undefined ? `the model declares ${ctx}; ` : ''}--context N sets it)\n`,
      )
    }
    const c = cluster.counters
    const forwards = result.generated
    const peers = await cluster.peerStats()
    const wireBytesPerToken = (cluster.wireBytes - wireBytesBefore) / Math.max(1, forwards)
    const summary = {
      model: model.path,
      peers: nPeers,
      plan: cluster.plan.shards,
      clusterPlan: cluster.clusterPlan,
      promptTokens: result.promptTokens,
      nextTokens: result.nextTokens,
      generated: result.generated,
      stopReason: result.stopReason,
      ttftMs: result.ttftMs,
      msPerToken: result.msPerToken,
      decodeSplit: result.decodeSplit,
      wireDtype: cluster.wireDtype,
      wireBytesPerToken,
      allreducesPerToken: c.allreduces / Math.max(1, forwards),
      computeMs: c.timings.computeMs,
      allreduceWaitMs: c.timings.allreduceMs,
      ioWaitMs: c.timings.ioWaitMs,
      stageWaitMs: c.stageWaitMs,
      perPeer: peers,
      recoveries: cluster.recoveries,
      loadAverage: loadavg()[0],
    }
    if (flags.summaryJson) writeFileSync(flags.summaryJson, `${JSON.stringify(summary, null, 2)}\n`)
    status(
      `${result.generated} tokens, TTFT ${result.ttftMs.toFixed(1)} ms, ${result.msPerToken.toFixed(2)} ms/token, ` +
        `${Math.round(wireBytesPerToken)} bytes/token on the wire (${cluster.wireDtype} allreduce), ${nPeers} peer${nPeers === 1 ? '' : 's'}${recovered(cluster.recoveries.length, cluster.size)}, load ${loadavg()[0]!.toFixed(2)}`,
    )
    const mib = (b: number): string => `${(b / 2 ** 20).toFixed(0)} MiB`
    for (const [i, p] of peers.entries()) {
      const per = (ms: number): string => (ms / Math.max(1, p.forwards)).toFixed(2)
      status(
        `  ${i === 0 ? 'master  ' : `worker ${cluster.workerDevices[i - 1]}`} ms/token: compute ${per(p.computeMs)}, allreduce wait ${per(p.allreduceMs)}, ` +
          `I/O wait ${per(p.ioWaitMs)}; window ${p.window} blocks; RSS peak ${mib(p.peakRssBytes)} (runtime ${mib(p.overheadBytes)})`,
      )
    }
  } finally {
    if (logitsFd !== null) closeSync(logitsFd)
    await started.stop()
  }
}

/** ` (2 after 1 recovery)` when workers were lost and replaced, else nothing. */
function recovered(recoveries: number, peers: number): string {
  return recoveries === 0 ? '' : ` (${peers} after ${recoveries} recover${recoveries === 1 ? 'y' : 'ies'})`
}

/** Multiaddrs on the loopback interface. */
const LOOPBACK = /^\/ip4\/127\.|^\/ip6\/::1\//

/** How long after start an agent that hears its own peer id announced by another process (mDNS) exits, ms. */
const DUPLICATE_IDENTITY_GRACE_MS = 5_000

interface AgentFlags extends SecurityFlags {
  listen: string[]
  exitWithParent?: boolean
  memoryBudget?: number
  shardDir?: string
  mdns: boolean
}

async function agent(flags: AgentFlags): Promise<void> {
  let ending = false
  const startedMs = performance.now()
  const security = await loadSecurity(flags, 'agent', {
    onRefused: (refusal) => process.stderr.write(`edgeshard agent: ${describeRefusal(refusal, security.membership)}\n`),
  })
  if (security.identity.created) process.stderr.write(`edgeshard agent: created identity key ${security.identity.path}\n`)
  const worker = new WorkerAgent({
    listen: flags.listen,
    transport: {
      privateKey: security.identity.privateKey,
      ...(security.membership ? { membership: security.membership } : {}),
      // Another agent announcing our peer id on the LAN: a copied key. The newcomer (us, if just started) gives way.
      onSelfDiscovered: (announced) => {
        // its loopback address is its own machine's, not ours: name the others when there are any
        const remote = announced.filter((a) => !LOOPBACK.test(a))
        const addresses = remote.length > 0 ? remote : announced
        const line = `peer ID ${security.identity.peerId} is used by two agents (this one and the one at ${addresses.join(', ')}): copy of an identity key?`
        if (performance.now() - startedMs < DUPLICATE_IDENTITY_GRACE_MS) {
          process.stderr.write(`edgeshard: ${line}\n`)
          void shutdown(2)
        } else {
          process.stderr.write(`edgeshard agent: warning: ${line}\n`)
        }
      },
    },
    // Announced on the LAN unless --no-mdns or only reachable on loopback (local workers of `run --peers`).
    mdns: flags.mdns && flags.listen.some((a) => !LOOPBACK.test(a)),
    ...(flags.memoryBudget === undefined ? {} : { memoryBudgetBytes: flags.memoryBudget }),
    ...(flags.shardDir === undefined ? {} : { shardDir: flags.shardDir }),
    measure: () => measureAndPublish(),
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
  // Publish this device's measured profile (cached, or measured now in the background; local workers only load it).
  void publishDeviceProfile({ measure: !flags.exitWithParent }).catch((err: Error) =>
    process.stderr.write(`edgeshard agent: cannot measure this device: ${err.message}\n`),
  )
}

const program = new Command('edgeshard')
  .description('Run one model across several small devices: tensor-parallel inference over libp2p')
  .exitOverride()

/** The generation options of `run` (and `emulate`). */
function addGenerationOptions(command: Command): Command {
  return command
    .option('--prompt <text>', 'prompt text', 'Once upon a time')
    .addOption(new Option('--max-tokens <k>', 'new tokens to generate at most').argParser(wholeNumber(1)).default(256))
    .addOption(new Option('--temperature <t>', '0 = greedy').argParser(finiteNumber).default(0))
    .addOption(new Option('--top-p <p>', 'nucleus sampling threshold').argParser(finiteNumber).default(0.9))
    .addOption(new Option('--seed <s>', 'sampling seed (default: the clock)').argParser(wholeNumber(1)))
    .option('--dump-logits <file>', 'write the logits of every position as raw f32 [positions, vocab]')
    .option('--summary-json <file>', 'write the run summary (tokens, timings, bytes) as JSON')
}

const runCommand = addGenerationOptions(
  program.command('run').description('generate text with the model split across this device and its peers (this device is the master)'),
)
addClusterOptions(runCommand).action((flags: RunFlags) => run(flags))
registerEmulate<RunFlags & { cluster: string }>(program, (command) => addClusterOptions(addGenerationOptions(command)), run)

const agentCommand = program
  .command('agent')
  .description('run a worker agent: print its multiaddr, accept a shard from a master and serve it')
  .option('--listen <addr>', 'multiaddr to listen on (repeatable, comma-separated)', collect)
  .option('--exit-with-parent', 'exit when the master session ends or stdin closes (used for local workers)')
  .addOption(new Option('--memory-budget <bytes>', 'bytes for weights + KV cache (e.g. 300MB); larger shards stream from disk').argParser(byteSize))
  .option('--shard-dir <dir>', 'where --memory-budget stores shard files, kept after the session (default: a temporary folder removed with it)')
  .option('--no-mdns', 'do not announce this agent on the LAN (mDNS); masters then need its address')
addSecurityOptions(agentCommand).action((flags: Omit<AgentFlags, 'listen'> & { listen?: string[] }) =>
  agent({ ...flags, listen: flags.listen ?? ['/ip4/0.0.0.0/tcp/0'] }),
)

registerQuantize(program)
registerSynth(program)
registerServe(program)
registerPeers(program)
registerSplit(program)
registerReport(program)
registerProfile(program)
registerPlan(program)
registerIdentity(program)

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
