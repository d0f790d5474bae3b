import { spawnSync } from 'node:child_process'
import { existsSync, statSync } from 'node:fs'
import { describe, expect, it } from 'vitest'

// onnxruntime's usage telemetry stays off: a process that runs a session through agent/runtime.ts leaves no
// /tmp/mat-debug-<pid>.log behind (onnxruntime 1.30 writes one per process otherwise).
describe('onnxruntime environment', () => {
  it('runs sessions with telemetry off (no /tmp/mat-debug-<pid>.log)', () => {
    const script = `
      const { Session } = await import(${JSON.stringify(new URL('../../agent/runtime.ts', import.meta.url).href)})
      const { GraphBuilder } = await import(${JSON.stringify(new URL('../../splitter/index.ts', import.meta.url).href)})
      const g = new GraphBuilder('twice')
      const x = g.input('x', 'float32', [2])
      g.output(g.op('Add', [x, x]), 'y', 'float32', [2])
      const s = await Session.create('twice', g.toBytes())
      const out = await s.run({ x: { data: Float32Array.of(1, 2), dims: [2] } })
      process.stdout.write(JSON.stringify({ pid: process.pid, y: Array.from(out.y.data) }))`
    const env = { ...process.env }
    delete env.ORT_DISABLE_TELEMETRY
    const startedMs = Date.now() - 1000 // file times have coarse granularity
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', env })
    expect(r.status).toBe(0)
    const { pid, y } = JSON.parse(r.stdout) as { pid: number; y: number[] }
    expect(y).toEqual([2, 4])
    // pids are reused: a log left by an earlier process with this pid is older than this run.
    const log = `/tmp/mat-debug-${pid}.log`
    expect(existsSync(log) && statSync(log).mtimeMs >= startedMs).toBe(false)
  })
})
