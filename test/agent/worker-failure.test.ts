import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { HAVE_MODELS, MODELS_DIR, processAlive, runKillingWorker, waitFor } from '../support/cli.ts'

describe.skipIf(!HAVE_MODELS)('a worker killed mid-generation with --no-recover', () => {
  it('makes the master exit non-zero within 10 s naming that peer, and leaves no process behind (--no-recover)', async () => {
    const { result, killedAt, killedPid, peer, workers } = await runKillingWorker(
      ['run', '--model', join(MODELS_DIR, 'stories260K.bin'), '--peers', '3', '--max-tokens', '400', '--temperature', '0.8', '--seed', '7', '--no-recover'],
      2,
    )
    expect(killedAt).toBeGreaterThan(0)
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
