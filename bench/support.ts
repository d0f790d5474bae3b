/** Shared pieces of the benchmarks: run the CLI for a summary, make synthetic models once, measure memory bandwidth. */
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Session } from '../agent/runtime.ts'
import { GraphBuilder } from '../splitter/index.ts'

export const CLI = fileURLToPath(new URL('../agent/cli.ts', import.meta.url))
export const BENCH_DIR = join(tmpdir(), 'edgeshard-bench')
mkdirSync(BENCH_DIR, { recursive: true })

/** Runs `edgeshard ...args --summary-json F --quiet` and returns the parsed summary; exits the bench on failure. */
export function runSummary<T = Record<string, unknown>>(args: readonly string[], tag: string): T {
  const path = join(BENCH_DIR, `${tag}.json`)
  const p = spawnSync(process.execPath, [CLI, ...args, '--quiet', '--summary-json', path], { encoding: 'utf8', maxBuffer: 64 * 2 ** 20 })
  if (p.status !== 0) {
    console.error(`bench: edgeshard ${args.join(' ')} failed: ${p.stderr}`)
    process.exit(1)
  }
  return JSON.parse(readFileSync(path, 'utf8')) as T
}

/** A synthetic model in the bench folder, made once (`edgeshard synth`) and reused by later runs. */
export function synthModel(shape: string, type: string): string {
  const path = join(BENCH_DIR, `${shape}-${type}.gguf`)
  if (!existsSync(path)) {
    const p = spawnSync(process.execPath, [CLI, 'synth', '--shape', shape, '--type', type, '--seed', '1', '--out', path, '--quiet'], {
      stdio: 'inherit',
    })
    if (p.status !== 0) process.exit(1)
  }
  return path
}

/**
 * Memory read bandwidth in GB/s measured through onnxruntime (ReduceSum over a 256 MiB f32 input that ORT reads in
 * place, `threads` intra-op threads, median of 7).
 */
export async function memoryBandwidthGBs(threads: number): Promise<number> {
  const n = 64 * 2 ** 20 // [n] f32 = 256 MiB
  const g = new GraphBuilder('bandwidth')
  const x = g.input('x', 'float32', [n])
  g.output(g.op('ReduceSum', [x], { keepdims: 0 }), 'y', 'float32', [])
  const session = await Session.create('bandwidth', g.toBytes(), { threads })
  const data = new Float32Array(n).fill(1)
  const times: number[] = []
  for (let i = 0; i < 8; i++) {
    const t0 = performance.now()
    await session.run({ x: { data, dims: [n] } })
    if (i > 0) times.push(performance.now() - t0)
  }
  await session.release()
  times.sort((a, b) => a - b)
  return (n * 4) / (times[Math.floor(times.length / 2)]! / 1000) / 1e9
}
