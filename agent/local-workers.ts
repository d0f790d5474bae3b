import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { cpus } from 'node:os'
import { fileURLToPath } from 'node:url'
import { logger } from '@libp2p/logger'
import { PeerFailedError } from './errors.ts'

const log = logger('edgeshard:agent:local')

/** Path of the CLI entry point the workers run. */
const CLI_PATH = fileURLToPath(new URL('./cli.ts', import.meta.url))

/** Worker processes on this machine, for `edgeshard run --peers N`. */
export interface LocalWorkers {
  /** Their listen multiaddrs, in spawn order. */
  readonly addresses: readonly string[]
  readonly processes: readonly ChildProcess[]
  /** Ends every worker (SIGTERM, then SIGKILL after `graceMs`) and waits for them to exit. */
  stop(graceMs?: number): Promise<void>
}

const alive = new Set<ChildProcess>()
// Last resort against orphans: a master that exits for any reason takes its workers along. (Workers also exit when
// their stdin closes, which covers a master killed with SIGKILL.)
process.on('exit', () => {
  for (const child of alive) child.kill('SIGKILL')
})

/**
 * Spawns `count` worker agents (`edgeshard agent --listen /ip4/127.0.0.1/tcp/0 --exit-with-parent`) and waits for
 * each to print its listen address. Worker i (1-based) gets `agentArgs(i)` (identity and membership flags; default `--no-identity`:
 * an ephemeral key, a new peer id each start, since several agents on one machine cannot share the default key file).
 * @throws PeerFailedError when a worker exits or stays silent for `timeoutMs` before listening; every worker
 *   already started is stopped first.
 */
export async function spawnLocalWorkers(
  count: number,
  options: { timeoutMs?: number; signal?: AbortSignal; memoryBudgetBytes?: number; pinCores?: boolean; agentArgs?: (index: number) => readonly string[] } = {},
): Promise<LocalWorkers> {
  const processes: ChildProcess[] = []
  const stop = async (graceMs = 2000): Promise<void> => {
    await Promise.all(processes.map((p) => stopChild(p, graceMs)))
  }
  try {
    const addresses = await Promise.all(
      Array.from({ length: count }, (_, i) => {
        const budget = options.memoryBudgetBytes === undefined ? [] : ['--memory-budget', String(options.memoryBudgetBytes)]
        // Local workers keep an ephemeral identity (a fresh key each start) unless `agentArgs` says otherwise.
        const identity = options.agentArgs?.(i + 1) ?? ['--no-identity']
        const child = spawn(process.execPath, [CLI_PATH, 'agent', '--listen', '/ip4/127.0.0.1/tcp/0', '--exit-with-parent', ...identity, ...budget], {
          stdio: ['pipe', 'pipe', 'inherit'],
          env: process.env,
        })
        processes.push(child)
        alive.add(child)
        if (options.pinCores && child.pid) pinToCore(child.pid, (i + 1) % cpus().length)
        child.once('exit', () => alive.delete(child))
        return readAddress(child, i + 1, options.timeoutMs ?? 30_000, options.signal)
      }),
    )
    return { addresses, processes, stop }
  } catch (err) {
    await stop(0)
    throw err
  }
}

function readAddress(child: ChildProcess, index: number, timeoutMs: number, signal?: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    let buffered = ''
    const timer = setTimeout(() => done(new PeerFailedError(`pid ${child.pid}`, `worker ${index} (pid ${child.pid}) did not start within ${timeoutMs} ms`)), timeoutMs)
    const onAbort = (): void => done(signal?.reason as Error)
    signal?.addEventListener('abort', onAbort, { once: true })
    const onData = (chunk: Buffer): void => {
      buffered += chunk.toString('utf8')
      const match = /^listening (\S+)$/m.exec(buffered)
      if (match) done(null, match[1])
    }
    const onExit = (code: number | null): void =>
      done(new PeerFailedError(`pid ${child.pid}`, `worker ${index} (pid ${child.pid}) exited with code ${code} before listening`))
    const done = (err: Error | null, address?: string): void => {
      clearTimeout(timer)
      signal?.removeEventListener('abort', onAbort)
      child.stdout?.off('data', onData)
      child.off('exit', onExit)
      if (err) reject(err)
      else {
        log('worker %d (pid %d) listening on %s', index, child.pid, address)
        child.stdout?.resume() // keep draining so the worker never blocks on a full pipe
        resolve(address!)
      }
    }
    child.stdout?.on('data', onData)
    child.once('exit', onExit)
  })
}

function stopChild(child: ChildProcess, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
    child.once('exit', () => {
      clearTimeout(timer)
      resolve()
    })
    child.stdin?.end()
    if (graceMs === 0) child.kill('SIGKILL')
    else child.kill('SIGTERM')
  })
}

/**
 * Pins process `pid` (all its threads) to CPU `core` with util-linux `taskset -a` (Linux). Where taskset is missing or refuses, the
 * process stays unpinned and a debug line says so.
 */
export function pinToCore(pid: number, core: number): void {
  const r = spawnSync('taskset', ['-a', '-cp', String(core), String(pid)], { stdio: 'ignore' })
  if (r.status !== 0) log('could not pin pid %d to core %d (taskset %s)', pid, core, r.error?.message ?? `exit ${r.status}`)
}
