import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

/** ../shared/models beside the repository. */
export const MODELS_DIR = fileURLToPath(new URL('../../../shared/models/', import.meta.url))
export const HAVE_MODELS = existsSync(`${MODELS_DIR}stories260K.bin`)
if (!HAVE_MODELS) process.stderr.write(`skipping tests on the real model: ${MODELS_DIR} is absent\n`)

export const CLI = fileURLToPath(new URL('../../agent/cli.ts', import.meta.url))

/** One case of stories260K.reference.json (format: ../shared/models/README.md). */
export interface ReferenceCase {
  prompt: string
  steps: number
  temperature: number
  prompt_tokens: number[]
  next_tokens: number[]
  stdout: string
}

export function referenceCases(): ReferenceCase[] {
  return HAVE_MODELS ? (JSON.parse(readFileSync(`${MODELS_DIR}stories260K.reference.json`, 'utf8')) as ReferenceCase[]) : []
}

export interface CliResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: Buffer
  stderr: string
}

/** Runs `edgeshard ...args` as a real process with the pinned Node (`env`: variables added to this process's). */
export function runCli(
  args: readonly string[],
  options: { timeoutMs?: number; onSpawn?: (child: ChildProcess) => void; env?: NodeJS.ProcessEnv } = {},
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], ...(options.env ? { env: { ...process.env, ...options.env } } : {}) })
    const out: Buffer[] = []
    let err = ''
    child.stdout.on('data', (b: Buffer) => out.push(b))
    child.stderr.on('data', (b: Buffer) => {
      err += b.toString('utf8')
    })
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      reject(new Error(`edgeshard ${args.join(' ')} did not finish in ${options.timeoutMs ?? 60_000} ms; stderr: ${err}`))
    }, options.timeoutMs ?? 60_000)
    child.on('error', reject)
    child.on('exit', (code, signal) => {
      clearTimeout(timer)
      resolve({ code, signal, stdout: Buffer.concat(out), stderr: err })
    })
    options.onSpawn?.(child)
  })
}

/** True while process `pid` exists (and is not a zombie). */
export function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return !/^\d+ \(.*\) Z/.test(stat)
  } catch {
    return false
  }
}

/** Direct children of `pid` (from /proc). */
export function childPids(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number)
  } catch {
    return []
  }
}

/** Polls `check` every 50 ms until it holds or `timeoutMs` passes; returns its last value. */
export async function waitFor(check: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs
  while (Date.now() < end) {
    if (check()) return true
    await new Promise((r) => setTimeout(r, 50))
  }
  return check()
}

/** What {@link runKillingWorker} saw: the run, the killed worker, and every worker process the master had. */
export interface KilledWorkerRun {
  readonly result: CliResult
  readonly killedAt: number
  readonly killedPid: number
  /** Peer id of the killed worker (from its `worker N ready` line). */
  readonly peer: string
  readonly workers: readonly number[]
}

/**
 * Runs `edgeshard ...args` with local workers and SIGKILLs local worker `worker` as soon as the first text is out
 * (generation under way), finding its pid and peer id in the master's `worker N ready` status line.
 */
export async function runKillingWorker(args: readonly string[], worker: number, timeoutMs = 60_000): Promise<KilledWorkerRun> {
  let masterPid = 0
  let killedAt = 0
  let killedPid = 0
  let workers: number[] = []
  let stderr = ''
  const ready = new RegExp(`worker ${worker} ready: peer (\\S+) at \\S+ \\(pid (\\d+)\\)`)
  const result = await runCli(args, {
    timeoutMs,
    onSpawn: (child) => {
      masterPid = child.pid!
      child.stderr!.on('data', (b: Buffer) => {
        stderr += b.toString()
      })
      child.stdout!.on('data', () => {
        if (killedAt !== 0) return
        const match = ready.exec(stderr)
        if (!match) return
        workers = childPids(masterPid)
        killedPid = Number(match[2])
        killedAt = Date.now()
        process.kill(killedPid, 'SIGKILL')
      })
    },
  })
  return { result, killedAt, killedPid, peer: ready.exec(stderr)?.[1] ?? '', workers }
}

/** A running `edgeshard agent` process (a worker that outlives its masters). */
export interface RunningAgent {
  readonly address: string
  readonly child: ChildProcess
  /** What the agent wrote to stderr so far (only with `captureStderr`; otherwise it goes to the test's stderr). */
  stderr(): string
  stop(): Promise<void>
}

/**
 * Starts `edgeshard agent --listen /ip4/127.0.0.1/tcp/0` and waits for its `listening` line. The agent gets a fresh
 * key (`--no-identity`: several agents on one machine cannot share the default key file) unless `extraArgs` names
 * one with `--identity`, and listens where `extraArgs` says with `--listen` if it does.
 */
export function startAgent(timeoutMs = 30_000, extraArgs: readonly string[] = [], options: { captureStderr?: boolean } = {}): Promise<RunningAgent> {
  return new Promise((resolve, reject) => {
    const identity = extraArgs.includes('--identity') ? [] : ['--no-identity']
    const listen = extraArgs.includes('--listen') ? [] : ['--listen', '/ip4/127.0.0.1/tcp/0']
    const child = spawn(process.execPath, [CLI, 'agent', ...listen, ...identity, ...extraArgs], {
      stdio: ['ignore', 'pipe', options.captureStderr ? 'pipe' : 'inherit'],
    })
    let stderr = ''
    child.stderr?.on('data', (b: Buffer) => {
      stderr += b.toString()
    })
    let buffered = ''
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      reject(new Error('edgeshard agent did not print its address'))
    }, timeoutMs)
    child.stdout!.on('data', (b: Buffer) => {
      buffered += b.toString()
      const match = /^listening (\S+)$/m.exec(buffered)
      if (!match) return
      clearTimeout(timer)
      resolve({
        address: match[1]!,
        child,
        stderr: () => stderr,
        stop: () =>
          new Promise<void>((done) => {
            if (child.exitCode !== null || child.signalCode !== null) return done()
            child.once('exit', () => done())
            child.kill('SIGTERM')
          }),
      })
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`edgeshard agent exited with code ${code} before listening${stderr ? `: ${stderr.trim()}` : ''}`))
    })
  })
}

/** A running `edgeshard serve` process. */
export interface Served {
  readonly child: ChildProcess
  /** `http://HOST:PORT/v1`. */
  readonly baseURL: string
  stderr(): string
  stop(): Promise<void>
}

/** Starts `edgeshard serve --port 0 ...args` and waits for its `listening` line. */
export function startServe(args: readonly string[], timeoutMs = 60_000): Promise<Served> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, 'serve', '--port', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stderr.on('data', (b: Buffer) => {
      err += b.toString()
    })
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      reject(new Error(`edgeshard serve did not start; stderr: ${err}`))
    }, timeoutMs)
    child.once('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`edgeshard serve exited with code ${code}; stderr: ${err}`))
    })
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString()
      const match = /^listening (http:\/\/\S+)$/m.exec(out)
      if (!match) return
      clearTimeout(timer)
      resolve({
        child,
        baseURL: `${match[1]}/v1`,
        stderr: () => err,
        stop: () =>
          new Promise<void>((done) => {
            if (child.exitCode !== null || child.signalCode !== null) return done()
            child.once('exit', () => done())
            child.kill('SIGTERM')
          }),
      })
    })
  })
}

/**
 * `edgeshard run ...args` with its summary and logits dumped to `dir/<tag>.json` and `dir/<tag>.f32`.
 * @returns the summary, the logits ([positions, vocab] f32) and stdout
 * @throws Error with the CLI's stderr when it fails or prints a stack trace
 */
export async function runWithLogits<S>(dir: string, tag: string, args: readonly string[]): Promise<{ summary: S; logits: Float32Array; stdout: Buffer }> {
  const summaryPath = join(dir, `${tag}.json`)
  const logitsPath = join(dir, `${tag}.f32`)
  const result = await runCli(['run', ...args, '--summary-json', summaryPath, '--dump-logits', logitsPath])
  if (result.code !== 0 || /Error:|at .*\.ts:\d+/.test(result.stderr)) {
    throw new Error(`edgeshard run ${args.join(' ')} exited with ${result.code}: ${result.stderr}`)
  }
  const bytes = readFileSync(logitsPath)
  return {
    summary: JSON.parse(readFileSync(summaryPath, 'utf8')) as S,
    logits: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4),
    stdout: result.stdout,
  }
}
