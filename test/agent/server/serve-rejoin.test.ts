/**
 * "A peer that comes back or a new peer is used from the next request on", real processes on 127.0.0.1:
 * `edgeshard serve` over two standalone agents found at `--bootstrap` addresses (a third address has no agent yet).
 * One agent is killed (SIGKILL) mid-request: that request still gives llama2.c's reference text, on 2 peers. The agent
 * restarts with the same identity at the same address: the next request re-installs the starting plan on 3 peers. An
 * agent then appears at the third address: the request after is re-planned over 4 peers. Every text is the reference.
 */
import { mkdtempSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { afterAll, describe, expect, it } from 'vitest'
import { HAVE_MODELS, MODELS_DIR, type RunningAgent, referenceCases, runCli, type Served, startAgent, startServe, waitFor } from '../../support/cli.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-rejoin-'))
const cases = referenceCases()

/** A TCP port free on 127.0.0.1 now (the kernel's pick for port 0). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
}

/** An agent identity: its key file, peer id, and a fixed address on 127.0.0.1 (so a restart answers there again). */
async function identity(name: string): Promise<{ key: string; peer: string; listen: string; address: string }> {
  const key = join(dir, `${name}.key`)
  const r = await runCli(['identity', '--identity', key])
  expect(r.code).toBe(0)
  const peer = r.stdout.toString().trim()
  const listen = `/ip4/127.0.0.1/tcp/${await freePort()}`
  return { key, peer, listen, address: `${listen}/p2p/${peer}` }
}

const start = (id: { key: string; listen: string }): Promise<RunningAgent> => startAgent(30_000, ['--identity', id.key, '--listen', id.listen], { captureStderr: true })

/** Greedy completion of reference case `index` as run.c printed it (prompt and final newline off), and its request. */
function reference(index: number): { prompt: string; maxTokens: number; text: string } {
  const c = cases[index]!
  return { prompt: c.prompt, maxTokens: c.steps - c.prompt_tokens.length + 1, text: c.stdout.slice(c.prompt.length, -1) }
}

/** Peers of each finished completion, from the access log (`POST /v1/completions 200 length, …, 812 ms, 3 peers`). */
function peersPerRequest(stderr: string): number[] {
  return [...stderr.matchAll(/POST \/v1\/completions 200 \w+, .*, (\d+) peers?$/gm)].map((m) => Number(m[1]))
}

describe.skipIf(!HAVE_MODELS)('edgeshard serve: workers that come back or appear join at the next request', () => {
  const agents: RunningAgent[] = []
  let served: Served | undefined
  afterAll(async () => {
    await served?.stop()
    await Promise.all(agents.map((a) => a.stop()))
  })

  it('a killed agent restarted with its identity, then a new agent, are used from the next request on; every text is the reference', async () => {
    const [a, b, c] = [await identity('a'), await identity('b'), await identity('c')]
    agents.push(await start(a), await start(b))
    served = await startServe([
      '--model', join(MODELS_DIR, 'stories260K.bin'),
      '--bootstrap', [a.address, b.address, c.address].join(','),
      '--discover', '2',
      '--identity', join(dir, 'master.key'),
      '--context', '4096',
      // A killed agent is noticed at once (its stream ends); a long deadline keeps a loaded machine's slow worker in.
      '--peer-deadline', '10000',
    ])
    const log = served.stderr
    // Devices follow free memory: find the one agent b became.
    const ready = new RegExp(`worker (\\d) ready: peer ${b.peer} at `).exec(log())
    expect(ready, log()).not.toBeNull()
    const deviceB = Number(ready![1])
    const client = new OpenAI({ baseURL: served.baseURL, apiKey: 'none', maxRetries: 0, timeout: 120_000 })

    // 1. b is killed mid-request (streaming): the request finishes with the reference text on the 2 peers left.
    const first = reference(0)
    const stream = await client.completions.create({ model: 'stories260K', prompt: first.prompt, max_tokens: first.maxTokens, temperature: 0, stream: true })
    let text = ''
    let chunks = 0
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? ''
      if (++chunks === 20) agents[1]!.child.kill('SIGKILL')
    }
    expect(text).toBe(first.text)
    expect(log()).toMatch(new RegExp(`worker ${deviceB} \\(peer ${b.peer}\\) lost \\(went away\\): the master took over its shard`))
    expect(await waitFor(() => peersPerRequest(log()).length === 1, 5_000)).toBe(true)
    expect(peersPerRequest(log())).toEqual([2])

    // 2. b restarts with its key at its address: the next request runs the starting plan on 3 peers again.
    await agents[1]!.stop()
    agents[1] = await start(b)
    const second = reference(2)
    const r2 = await client.completions.create({ model: 'stories260K', prompt: second.prompt, max_tokens: second.maxTokens, temperature: 0 })
    expect(r2.choices[0]!.text).toBe(second.text)
    expect(log()).toMatch(new RegExp(`worker ${deviceB} \\(peer ${b.peer} at ${b.address}\\) joined: 3 peers, the starting plan again`))
    expect(await waitFor(() => peersPerRequest(log()).length === 2, 5_000)).toBe(true)
    expect(peersPerRequest(log())).toEqual([2, 3])

    // 3. A new agent answers at the third bootstrap address: the request after it is up runs on 4 peers.
    agents.push(await start(c))
    // The address went unanswered at earlier requests: it is asked again once its back-off (at most 2 s by now) ends.
    await new Promise((resolve) => setTimeout(resolve, 2_500))
    const third = reference(3)
    const r3 = await client.completions.create({ model: 'stories260K', prompt: third.prompt, max_tokens: third.maxTokens, temperature: 0 })
    expect(r3.choices[0]!.text).toBe(third.text)
    expect(log()).toMatch(new RegExp(`worker 3 \\(peer ${c.peer} at ${c.address}\\) joined: 4 peers, re-planned (by the planner|with an even split)`))
    expect(await waitFor(() => peersPerRequest(log()).length === 3, 5_000)).toBe(true)
    expect(peersPerRequest(log())).toEqual([2, 3, 4])
  }, 180_000)
})
