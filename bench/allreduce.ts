/**
 * Star allreduce latency among real processes on 127.0.0.1: edgeshard's path (TransportNode: libp2p TCP + noise +
 * yamux, FramedChannel, StarAllreduceHub/Member) against a floor written here — plain `net` sockets (TCP_NODELAY)
 * carrying the same frames (`encodeFrame` / `FrameDecoder`) with a minimal hub.
 *
 * Every process runs the allreduce in a loop with no compute in between; the hub process times each of its rounds
 * (from one sum sent to the next sum sent = the sum's hop to the workers, their turnaround, the partials' hop back,
 * the summation). Paths run interleaved, `--repeats` passes, times pooled. Prints one JSON document: per (path,
 * processes, f32 count) the median / p90 / p99 round in ms, the ratio to the floor's median, and the CPU time per
 * round (µs, user + system) of the hub and of all processes — the load-robust cost, and the one that sets latency
 * when peers share cores — with the load average before and after. `edgeshard-f16` sends f16 on the wire
 * (`maxAbsError` against the exact f32 sum).
 *
 * Usage: `npm run bench:allreduce [-- --rounds 1000 --repeats 2 --procs 2,4 --sizes 2048,8192
 * --paths raw,edgeshard,edgeshard-f16 --diagnose --child-node-args="--cpu-prof --cpu-prof-dir=/tmp/prof"]`.
 * `--diagnose` adds libp2p variants that locate the cost (measurement only, see allreduce-diagnostics.ts): the stock
 * stack edgeshard used before (`libp2p-stock`), edgeshard's node with the library's default noise crypto, without
 * batched yamux window updates, and with a null cipher (noise framing, no encryption).
 */
import { type ChildProcess, fork } from 'node:child_process'
import { createServer, type Socket, connect as tcpConnect } from 'node:net'
import { cpus, loadavg } from 'node:os'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import {
  encodeFrame,
  type FramedChannel,
  FrameDecoder,
  f32Body,
  PeerGoneError,
  StarAllreduceHub,
  StarAllreduceMember,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
  type WireDtype,
} from '../transport/index.ts'
import { type DiagnosticVariant, diagnosticNode, isDiagnosticVariant } from './allreduce-diagnostics.ts'

const SELF = fileURLToPath(import.meta.url)

/** Deterministic partial of process `index` ([n] f32): values in [-1, 1) scaled by 10^-2..10^1. */
function partialOf(index: number, n: number): Float32Array {
  let a = (index * 2654435761 + 12345) >>> 0
  const out = new Float32Array(n)
  for (let k = 0; k < n; k++) {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    const u = ((t ^ (t >>> 14)) >>> 0) / 4294967296
    out[k] = (u * 2 - 1) * 10 ** ((k % 4) - 2)
  }
  return out
}

/** The expected sum: f32 additions, hub (index 0) first, then members in order. */
function expectedSum(processes: number, n: number): Float32Array {
  const out = partialOf(0, n)
  for (let i = 1; i < processes; i++) {
    const p = partialOf(i, n)
    for (let k = 0; k < n; k++) out[k] = Math.fround(out[k]! + p[k]!)
  }
  return out
}

// ---------------------------------------------------------------------------------------------------------------
// child processes

interface MemberStart {
  kind: 'member'
  path: string
  index: number
}
interface HubStart {
  kind: 'hub'
  path: string
  addresses: string[]
  n: number
  rounds: number
  warmup: number
}
type ChildMessage = MemberStart | HubStart

function send(message: unknown): void {
  process.send?.(message)
}

/** CPU time (user + system) this process spent since `markCpu()`, µs; the parent asks for it after the hub is done. */
let cpuMark: NodeJS.CpuUsage | undefined
function markCpu(): void {
  cpuMark = process.cpuUsage()
}
function cpuSinceMarkUs(): number {
  if (cpuMark === undefined) return 0
  const { user, system } = process.cpuUsage(cpuMark)
  return user + system
}
function answerCpuRequests(): void {
  process.on('message', (m) => {
    if ((m as { kind?: string }).kind === 'cpu') send({ cpuUs: cpuSinceMarkUs() })
  })
}

function wireDtypeOf(path: string): WireDtype {
  return path.endsWith('-f16') ? 'f16' : 'f32'
}

/** A member on plain TCP: listens, answers each sum with its next partial (same frames as edgeshard). */
async function rawMember(index: number): Promise<void> {
  const server = createServer({ noDelay: true }, (socket) => {
    socket.setNoDelay(true)
    const decoder = new FrameDecoder()
    let partial: Float32Array | undefined
    let warmup = 0
    const sendPartial = (tag: number): void => {
      const [head, body] = encodeFrame({ type: 'ar', tag }, partial)
      socket.cork()
      socket.write(head!)
      socket.write(body!)
      socket.uncork()
    }
    socket.on('data', (chunk: Buffer) => {
      for (const frame of decoder.push(chunk)) {
        const tag = frame.header.tag as number
        if (frame.header.type === 'start') {
          partial = partialOf(index, frame.header.n as number)
          warmup = frame.header.warmup as number
          sendPartial(0)
        } else {
          const sum = f32Body(frame)
          if (sum.length !== partial!.length) throw new Error(`member ${index}: sum of ${sum.length} f32`)
          if (tag + 1 === warmup) markCpu()
          sendPartial(tag + 1)
        }
      }
    })
    socket.on('error', () => {}) // the hub closes its sockets when done; the parent then ends this process
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('no TCP address')
  send({ ready: `127.0.0.1:${address.port}` })
}

/** The hub on plain TCP: waits for every member's partial, sums into a reused buffer, sends the sum back. */
async function rawHub(start: HubStart): Promise<void> {
  const { n } = start
  const sockets: Socket[] = []
  for (const address of start.addresses) {
    const [host, port] = address.split(':')
    const socket = tcpConnect({ host: host!, port: Number(port), noDelay: true })
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject))
    sockets.push(socket)
  }
  const own = partialOf(0, n)
  const sum = new Float32Array(n)
  const partials: (Float32Array | undefined)[] = new Array(sockets.length).fill(undefined)
  let arrived = 0
  let roundDone: (() => void) | undefined
  sockets.forEach((socket, i) => {
    const decoder = new FrameDecoder()
    socket.on('data', (chunk: Buffer) => {
      for (const frame of decoder.push(chunk)) {
        partials[i] = f32Body(frame)
        if (++arrived === sockets.length) roundDone?.()
      }
    })
  })
  const times: number[] = []
  const total = start.warmup + start.rounds
  let tag = 0
  for (const socket of sockets) socket.write(encodeFrame({ type: 'start', n, warmup: start.warmup })[0]!)
  let last = performance.now()
  for (let round = 0; round < total; round++) {
    if (round === start.warmup) markCpu()
    if (arrived < sockets.length) await new Promise<void>((resolve) => (roundDone = resolve))
    roundDone = undefined
    arrived = 0
    sum.set(own)
    for (const p of partials) for (let k = 0; k < n; k++) sum[k]! += p![k]!
    const [head, body] = encodeFrame({ type: 'ar', tag }, sum)
    for (const socket of sockets) {
      socket.cork()
      socket.write(head!)
      socket.write(body!)
      socket.uncork()
    }
    tag++
    const now = performance.now()
    if (round >= start.warmup) times.push(now - last)
    last = now
  }
  finishHub(times, sum, expectedSum(sockets.length + 1, n), 'f32')
  for (const socket of sockets) socket.destroy()
}

function finishHub(times: number[], got: Float32Array, want: Float32Array, dtype: WireDtype): void {
  let maxAbsError = 0
  for (let k = 0; k < want.length; k++) maxAbsError = Math.max(maxAbsError, Math.abs(got[k]! - want[k]!))
  const exact = maxAbsError === 0
  if (dtype === 'f32' && !exact) throw new Error(`hub: wrong sum, max abs error ${maxAbsError}`)
  send({ times, maxAbsError, hubCpuUs: cpuSinceMarkUs() })
}

interface LinkNode {
  start(): Promise<void>
  stop(): Promise<void>
  multiaddrs(): string[]
  handle(protocol: string, handler: (channel: FramedChannel) => void | Promise<void>): Promise<void>
  dial(address: string, protocol: string, options?: { signal?: AbortSignal }): Promise<FramedChannel>
}

function libp2pNode(path: string, listen: string[]): LinkNode {
  return isDiagnosticVariant(path) ? diagnosticNode(path as DiagnosticVariant, listen) : new TransportNode({ listen })
}

async function libp2pMember(path: string, index: number): Promise<void> {
  const node = libp2pNode(path, ['/ip4/127.0.0.1/tcp/0'])
  await node.start()
  const wireDtype = wireDtypeOf(path)
  await node.handle(TENSOR_PARALLEL_PROTOCOL, async (channel) => {
    const member = new StarAllreduceMember(channel, { wireDtype })
    const start = await channel.read()
    if (start === null) return
    const n = start.header.n as number
    const warmup = start.header.warmup as number
    const partial = partialOf(index, n)
    void (async () => {
      try {
        for await (const frame of channel) member.deliver(frame)
        member.fail(new PeerGoneError(channel.remotePeer))
      } catch (err) {
        member.fail(err)
      }
    })()
    try {
      for (let tag = 0; ; tag++) {
        if (tag === warmup) markCpu()
        await member.allreduce(tag, partial)
      }
    } catch {
      // the hub is done and gone; the parent asks for the CPU time, then ends this process
    }
  })
  send({ ready: node.multiaddrs()[0] })
}

async function libp2pHub(start: HubStart): Promise<void> {
  const { n } = start
  const node = libp2pNode(start.path, [])
  await node.start()
  const channels: FramedChannel[] = []
  for (const address of start.addresses) {
    channels.push(await node.dial(address, TENSOR_PARALLEL_PROTOCOL, { signal: AbortSignal.timeout(10_000) }))
  }
  const wireDtype = wireDtypeOf(start.path)
  const hub = new StarAllreduceHub(channels, { wireDtype })
  for (const channel of channels) await channel.send({ type: 'start', n, warmup: start.warmup })
  channels.forEach((channel, i) => {
    void (async () => {
      try {
        for await (const frame of channel) hub.deliver(i, frame)
        hub.fail(i, new PeerGoneError(channel.remotePeer))
      } catch (err) {
        hub.fail(i, err)
      }
    })()
  })
  const own = partialOf(0, n)
  const times: number[] = []
  let sum: Float32Array = new Float32Array(0)
  let last = performance.now()
  for (let round = 0; round < start.warmup + start.rounds; round++) {
    if (round === start.warmup) markCpu()
    sum = await hub.allreduce(round, own)
    const now = performance.now()
    if (round >= start.warmup) times.push(now - last)
    last = now
  }
  finishHub(times, sum, expectedSum(channels.length + 1, n), wireDtype)
  await node.stop()
}

async function child(): Promise<void> {
  const start = await new Promise<ChildMessage>((resolve) => process.once('message', (m) => resolve(m as ChildMessage)))
  // exit (not die) on SIGTERM or a lost parent, so --cpu-prof profiles get written
  process.on('disconnect', () => process.exit(0))
  process.on('SIGTERM', () => process.exit(0))
  answerCpuRequests()
  if (start.kind === 'member') {
    if (start.path === 'raw') await rawMember(start.index)
    else await libp2pMember(start.path, start.index)
  } else {
    if (start.path === 'raw') await rawHub(start)
    else await libp2pHub(start)
  }
}

// ---------------------------------------------------------------------------------------------------------------
// orchestration (parent process)

function nextMessage<T>(proc: ChildProcess): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onExit = (code: number | null): void => reject(new Error(`bench child exited with code ${code}`))
    proc.once('exit', onExit)
    proc.once('message', (m) => {
      proc.off('exit', onExit)
      resolve(m as T)
    })
  })
}

interface Run {
  times: number[]
  maxAbsError: number
  hubCpuUs: number
  /** CPU time of all processes over the measured rounds, µs. */
  totalCpuUs: number
}

async function runOne(
  path: string,
  processes: number,
  n: number,
  rounds: number,
  warmup: number,
  childNodeArgs: string[],
): Promise<Run> {
  const spawned: ChildProcess[] = []
  const execArgv = childNodeArgs
  const spawn = (): ChildProcess => {
    const proc = fork(SELF, ['--child'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv })
    spawned.push(proc)
    return proc
  }
  try {
    const members = Array.from({ length: processes - 1 }, () => spawn())
    const ready = members.map((m) => nextMessage<{ ready: string }>(m))
    members.forEach((m, i) => {
      m.send({ kind: 'member', path, index: i + 1 } satisfies MemberStart)
    })
    const addresses = (await Promise.all(ready)).map((r) => r.ready)
    const hub = spawn()
    const result = nextMessage<Omit<Run, 'totalCpuUs'>>(hub)
    hub.send({ kind: 'hub', path, addresses, n, rounds, warmup } satisfies HubStart)
    const run = await result
    const memberCpu = members.map((m) => nextMessage<{ cpuUs: number }>(m))
    for (const m of members) m.send({ kind: 'cpu' })
    const memberCpuUs = (await Promise.all(memberCpu)).reduce((total, r) => total + r.cpuUs, 0)
    return { ...run, totalCpuUs: run.hubCpuUs + memberCpuUs }
  } finally {
    for (const proc of spawned) proc.kill()
  }
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string', default: '1000' },
      warmup: { type: 'string', default: '200' },
      repeats: { type: 'string', default: '2' },
      procs: { type: 'string', default: '2,4' },
      sizes: { type: 'string', default: '2048,8192' },
      paths: { type: 'string', default: 'raw,edgeshard,edgeshard-f16' },
      diagnose: { type: 'boolean', default: false },
      'child-node-args': { type: 'string', default: '' }, // e.g. "--cpu-prof --cpu-prof-dir /tmp/prof" or "--trace-gc"
      child: { type: 'boolean', default: false },
    },
  })
  if (values.child) {
    await child()
    return
  }
  const rounds = Number(values.rounds)
  const warmup = Number(values.warmup)
  const repeats = Number(values.repeats)
  const paths = values.paths.split(',')
  if (values.diagnose) paths.push('libp2p-stock', 'libp2p-stock-crypto', 'libp2p-no-window-batching', 'libp2p-null-cipher')
  const loadBefore = loadavg()
  const results: Record<string, unknown>[] = []
  const round3 = (x: number): number => Math.round(x * 1000) / 1000
  for (const processes of values.procs.split(',').map(Number)) {
    for (const n of values.sizes.split(',').map(Number)) {
      // paths interleaved, `repeats` passes, times pooled: load swings hit every path alike
      const pooled = new Map<string, { times: number[]; hubCpuUs: number; totalCpuUs: number; maxAbsError: number }>()
      for (let pass = 0; pass < repeats; pass++) {
        for (const path of paths) {
          const childNodeArgs = values['child-node-args'].split(' ').filter((a) => a !== '')
          const run = await runOne(path, processes, n, rounds, warmup, childNodeArgs)
          const acc = pooled.get(path) ?? { times: [], hubCpuUs: 0, totalCpuUs: 0, maxAbsError: 0 }
          acc.times.push(...run.times)
          acc.hubCpuUs += run.hubCpuUs
          acc.totalCpuUs += run.totalCpuUs
          acc.maxAbsError = Math.max(acc.maxAbsError, run.maxAbsError)
          pooled.set(path, acc)
        }
      }
      const floor = pooled.get('raw')
      const floorMedian = floor === undefined ? Number.NaN : quantile([...floor.times].sort((a, b) => a - b), 0.5)
      for (const [path, acc] of pooled) {
        const sorted = [...acc.times].sort((a, b) => a - b)
        const median = quantile(sorted, 0.5)
        const measuredRounds = rounds * repeats
        results.push({
          path,
          processes,
          f32: n,
          medianMs: round3(median),
          p90Ms: round3(quantile(sorted, 0.9)),
          p99Ms: round3(quantile(sorted, 0.99)),
          ratioToFloor: Number.isNaN(floorMedian) ? null : Math.round((median / floorMedian) * 100) / 100,
          hubCpuUsPerRound: Math.round(acc.hubCpuUs / measuredRounds),
          allCpuUsPerRound: Math.round(acc.totalCpuUs / measuredRounds),
          ...(acc.maxAbsError > 0 ? { maxAbsError: acc.maxAbsError } : {}),
        })
        console.error(JSON.stringify(results.at(-1)))
      }
    }
  }
  const fixed = (xs: number[]): number[] => xs.map((x) => Math.round(x * 100) / 100)
  console.log(
    JSON.stringify(
      {
        bench:
          'star allreduce among processes on 127.0.0.1, no compute: hub round time (ms) and CPU time per round (µs, ' +
          'hub and all processes); raw = plain TCP with the same frames (the floor)',
        rounds,
        warmup,
        repeats,
        cpus: cpus().length,
        loadAverageBefore: fixed(loadBefore),
        loadAverageAfter: fixed(loadavg()),
        results,
      },
      null,
      2,
    ),
  )
}

await main()
