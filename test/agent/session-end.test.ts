/**
 * How a worker's session ends when nothing went wrong: after the master's `bye`, or because the agent itself is
 * stopped. Neither is a failure, so the agent prints no "session … ended: …" line and exits 0 — a line there is
 * what `run` relays to the user as if a peer had failed.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { TENSOR_PARALLEL_PROTOCOL, TransportNode } from '../../transport/index.ts'
import { type RunningAgent, startAgent } from '../support/cli.ts'

describe('a worker session that ends normally', () => {
  let agent: RunningAgent
  let master: TransportNode

  beforeEach(async () => {
    agent = await startAgent(30_000, [], { captureStderr: true })
    master = new TransportNode()
    await master.start()
  })
  afterEach(async () => {
    await master?.stop()
    await agent?.stop()
  })

  /** Opens a session and waits for the worker's answer to `stats`, so that the session is running. */
  async function openSession(): Promise<Awaited<ReturnType<TransportNode['dial']>>> {
    const channel = await master.dial(agent.address, TENSOR_PARALLEL_PROTOCOL)
    await channel.send({ type: 'stats' })
    const reply = await channel.read({ signal: AbortSignal.timeout(10_000) })
    expect(reply?.header.type).toBe('stats')
    return channel
  }

  it('after bye: the worker closes its half at once, and a master that then drops the stream causes no error', async () => {
    const channel = await openSession()
    await channel.send({ type: 'bye' })
    // The worker's close frame: it has read `bye` and ended the session.
    expect(await channel.read({ signal: AbortSignal.timeout(10_000) })).toBeNull()
    channel.abort(new Error('master gone without its close frame'))
    // A second session shows the agent serves on, and that it had time to report the first one had it failed.
    await (await openSession()).close()
    await new Promise((resolve) => setTimeout(resolve, 300))
    expect(agent.stderr()).toBe('')
  }, 30_000)

  it('stopped by SIGTERM during a session: no session error, exit code 0', async () => {
    await openSession()
    const exited = new Promise<number | null>((resolve) => agent.child.once('exit', (code) => resolve(code)))
    await agent.stop()
    expect(await exited).toBe(0)
    expect(agent.stderr()).toBe('')
  }, 30_000)
})
