/**
 * Sliding-window weight streaming vs resident weights (TPI-LLM §3.3): a synthetic model on N peers on this machine
 * (the master and N−1 agent processes), each with a memory budget, against the same cluster with all weights
 * resident: ms/token, TTFT, I/O wait per token, window, peak RSS and runtime overhead per peer. Prints JSON.
 * `npm run bench:window [-- --shape llama-2-7b --type q4_0 --peers 4 --budget 300MB]`.
 *
 * Quantized weights stream in the blockwise layout (splitter/quant/blockwise.ts) through batched MatMulInteger, since
 * onnxruntime's MatMulNBits is only fast on constant weights; resident mode bakes them into MatMulNBits.
 *
 * Where root and a cgroup v1 memory controller are available, the streaming run is repeated with every peer in a
 * memory cgroup limited to its budget + the runtime overhead it reported in the first streaming run, after dropping
 * the page cache where allowed: the shard reads of that run then compete for the same limit, so they come from disk
 * once the limit is reached. The output says whether that was done and whether the reads came from the page cache.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs'
import { cpus, loadavg } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { byteSize } from '../agent/cli/arguments.ts'
import { BENCH_DIR, CLI, synthModel } from './support.ts'

const { values } = parseArgs({
  options: {
    shape: { type: 'string', default: 'llama-2-7b' },
    type: { type: 'string', default: 'q4_0' },
    peers: { type: 'string', default: '4' },
    budget: { type: 'string', default: '300MB' },
    tokens: { type: 'string', default: '8' },
    context: { type: 'string', default: '128' },
  },
})
const model = synthModel(values.shape, values.type)
const peers = Number(values.peers)

interface Peer {
  window: number
  forwards: number
  ioWaitMs: number
  computeMs: number
  allreduceMs: number
  peakRssBytes: number
  overheadBytes: number
}
interface Summary {
  msPerToken: number
  ttftMs: number
  perPeer: Peer[]
}

const MEMORY_CGROUP = '/sys/fs/cgroup/memory'
/** Why memory cgroups cannot be used here, or null. */
function cgroupUnavailable(): string | null {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'not running as root'
  if (!existsSync(join(MEMORY_CGROUP, 'memory.limit_in_bytes'))) return 'no cgroup v1 memory controller'
  return null
}

/** Drops the page cache (root only); whether it was done. */
function dropPageCache(): boolean {
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '1')
    return true
  } catch {
    return false
  }
}

/** A command line run inside memory cgroup `group` (when given): the shell joins it, then execs. */
function inGroup(group: string | null, argv: readonly string[]): [string, string[]] {
  if (!group) return [argv[0]!, argv.slice(1)]
  return ['sh', ['-c', 'echo $$ > "$0/cgroup.procs" && exec "$@"', group, ...argv]]
}

function makeGroup(name: string, limitBytes: number): string {
  const dir = join(MEMORY_CGROUP, name)
  mkdirSync(dir, { recursive: true })
  writeFileSync(join(dir, 'memory.limit_in_bytes'), String(limitBytes))
  return dir
}

/** The group's peak usage, limit hits and OOM kills. */
function groupStats(dir: string): { maxUsageBytes: number; limitHits: number; oomKills: number } {
  const read = (f: string): string => readFileSync(join(dir, f), 'utf8')
  const oom = /oom_kill (\d+)/.exec(read('memory.oom_control'))
  return { maxUsageBytes: Number(read('memory.max_usage_in_bytes')), limitHits: Number(read('memory.failcnt')), oomKills: oom ? Number(oom[1]) : 0 }
}

/** Agents and masters started; killed if the bench is interrupted, so none is left behind. */
const children = new Set<ChildProcess>()
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    for (const c of children) c.kill('SIGKILL')
    process.exit(130)
  })
}

function startAgent(extra: readonly string[], group: string | null): Promise<{ address: string; child: ChildProcess }> {
  const [cmd, args] = inGroup(group, [process.execPath, CLI, 'agent', '--listen', '/ip4/127.0.0.1/tcp/0', '--no-identity', ...extra])
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'ignore'] })
  children.add(child)
  child.once('exit', () => children.delete(child))
  return new Promise((resolve, reject) => {
    let out = ''
    child.stdout!.on('data', (b: Buffer) => {
      out += b.toString()
      const m = /^listening (\S+)$/m.exec(out)
      if (m) resolve({ address: m[1]!, child })
    })
    child.once('exit', (code) => reject(new Error(`bench: agent exited with ${code} before listening`)))
  })
}

/** One run: N−1 agents and the master, each in its own memory group when `limits` is given. */
async function runCluster(tag: string, budget: string | null, limits: readonly number[] | null): Promise<{ summary: Summary; groups: ReturnType<typeof groupStats>[] | null }> {
  const groups = limits?.map((limit, i) => makeGroup(`edgeshard-bench-${process.pid}-${tag}-${i}`, limit)) ?? null
  const budgetArgs = budget ? ['--memory-budget', budget] : []
  const agents = []
  for (let i = 1; i < peers; i++) agents.push(await startAgent(budgetArgs, groups?.[i] ?? null))
  const summaryPath = join(BENCH_DIR, `window-${tag}.json`)
  const argv = [
    process.execPath, CLI, 'run', '--model', model, '--workers', agents.map((a) => a.address).join(','), '--max-tokens', values.tokens,
    '--context', values.context, '--temperature', '0', '--quiet', '--summary-json', summaryPath, ...budgetArgs,
    // Loading 4 shards of a 7B model on 2 shared cores stalls event loops for seconds: not a lost peer here.
    '--peer-deadline', '120000',
  ]
  const [cmd, args] = inGroup(groups?.[0] ?? null, argv)
  const master = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] })
  children.add(master)
  const code = await new Promise<number | null>((resolve) => master.once('exit', resolve))
  for (const a of agents) a.child.kill('SIGTERM')
  await Promise.all(agents.map((a) => (a.child.exitCode !== null ? null : new Promise((r) => a.child.once('exit', r)))))
  const stats = groups?.map(groupStats) ?? null
  for (const g of groups ?? []) rmdirSync(g)
  if (code !== 0) {
    console.error(`bench: the ${tag} run exited with ${code}`)
    process.exit(1)
  }
  return { summary: JSON.parse(readFileSync(summaryPath, 'utf8')) as Summary, groups: stats }
}

function row(mode: string, s: Summary, groups: { stats: ReturnType<typeof groupStats>[]; limitsBytes: readonly number[] } | null = null) {
  return {
    mode,
    msPerToken: s.msPerToken,
    ttftMs: s.ttftMs,
    peers: s.perPeer.map((p, i) => ({
      window: p.window,
      ioWaitMsPerToken: p.ioWaitMs / Math.max(1, p.forwards),
      computeMsPerToken: p.computeMs / Math.max(1, p.forwards),
      allreduceMsPerToken: p.allreduceMs / Math.max(1, p.forwards),
      peakRssMiB: p.peakRssBytes / 2 ** 20,
      runtimeOverheadMiB: p.overheadBytes / 2 ** 20,
      ...(groups ? { cgroup: { limitMiB: groups.limitsBytes[i]! / 2 ** 20, ...groups.stats[i]! } } : {}),
    })),
  }
}

const resident = await runCluster('resident', null, null)
const streaming = await runCluster('streaming', values.budget, null)
const results = [row('resident', resident.summary), row('streaming (page cache warm)', streaming.summary)]
const unavailable = cgroupUnavailable()
let cgroup: Record<string, unknown> = { done: false, reason: unavailable }
if (!unavailable) {
  const limits = streaming.summary.perPeer.map((p) => byteSize(values.budget) + p.overheadBytes)
  const dropped = dropPageCache()
  const limited = await runCluster('cgroup', values.budget, limits)
  results.push(row('streaming (each peer in a memory cgroup of budget + overhead)', limited.summary, { stats: limited.groups!, limitsBytes: limits }))
  cgroup = { done: true, limitsBytes: limits, pageCacheDropped: dropped }
}
console.log(
  JSON.stringify(
    {
      bench: 'sliding-window',
      model: `${values.shape} ${values.type} (synthetic)`,
      peers,
      budget: values.budget,
      context: Number(values.context),
      cgroup,
      pageCache:
        'the warm streaming run reads shard files just written, from the page cache; in the cgroup run the page cache counts against each peer’s limit, so reads beyond it come from disk',
      ratioStreamingToResident: streaming.summary.msPerToken / resident.summary.msPerToken,
      cpus: cpus().length,
      loadAverage: loadavg(),
      results,
    },
    null,
    2,
  ),
)
