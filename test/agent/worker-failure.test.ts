import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { childPids, HAVE_MODELS, MODELS_DIR, processAlive, runCli } from '../support/cli.ts'

async function waitFor(check: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs
  while (Date.now() < end) {
    if (check()) return true
    await new Promise((r) => setTimeout(r, 50))
  }
  return check()
}

describe.skipIf(!HAVE_MODELS)('a worker killed mid-generation with --no-recover', () => {
  it('makes the master exit non-zero within 10 s naming that peer, and leaves no process behind', async () => {
    let masterPid = 0
    let killedAt = 0
    let killedPid = 0
    let workers: number[] = []
    let stderr = ''
    const result = await runCli(
      ['run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--peers', '3', '--max-tokens', '400', '--temperature', '0.8', '--seed', '7', '--no-recover'],
      {
        timeoutMs: 60_000,
        onSpawn: (child) => {
          masterPid = child.pid!
          child.stderr!.on('data', (b: Buffer) => {
            stderr += b.toString()
          })
          child.stdout!.on('data', () => {
            if (killedAt !== 0) return
            // The first text is out: generation is under way. Kill worker 2.
            const match = /worker 2 ready: peer (\S+) at \S+ \(pid (\d+)\)/.exec(stderr)
            if (!match) return
            workers = childPids(masterPid)
            killedPid = Number(match[2])
            killedAt = Date.now()
            process.kill(killedPid, 'SIGKILL')
          })
        },
      },
    )
    expect(killedAt).toBeGreaterThan(0)
    const peer = /worker 2 ready: peer (\S+)/.exec(stderr)![1]!
    expect(result.code).toBe(1)
    expect(Date.now() - killedAt).toBeLessThan(10_000)
    const last = result.stderr.trimEnd().split('\n').at(-1)!
    expect(last).toMatch(/^edgeshard: worker 2 .*went away/)
    expect(last).toContain(peer)
    expect(result.stderr).not.toMatch(/\n\s+at /)
    expect(workers).toContain(killedPid)
    expect(workers.length).toBe(2)
    expect(await waitFor(() => workers.every((pid) => !processAlive(pid)), 5_000)).toBe(true)
  }, 90_000)
})
