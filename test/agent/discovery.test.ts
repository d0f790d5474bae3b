import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { CLI, HAVE_MODELS, MODELS_DIR, type RunningAgent, referenceCases, runCli, startAgent } from '../support/cli.ts'

// Discovery: the info protocol over --bootstrap on 127.0.0.1, then mDNS between two network namespaces joined by a
// veth pair (10.231.x.0/24, traffic never leaves them): an agent in one is found by `peers` and used by
// `run --discover` in the other.

interface Probe {
  peer: string
  address: string
  rttMs: number
  profile: { hostname: string; cores: number; totalMemoryBytes: number; freeMemoryBytes: number; nodeVersion: string; ortVersion: string; busy: boolean }
}

function expectProfile(probe: Probe | undefined): void {
  expect(probe).toBeDefined()
  expect(probe!.profile).toMatchObject({ nodeVersion: process.versions.node, ortVersion: expect.stringMatching(/^\d+\.\d+\.\d+/), busy: false })
  expect(probe!.profile.cores).toBeGreaterThan(0)
  expect(probe!.profile.freeMemoryBytes).toBeGreaterThan(0)
  expect(probe!.profile.freeMemoryBytes).toBeLessThanOrEqual(probe!.profile.totalMemoryBytes)
  expect(probe!.rttMs).toBeGreaterThan(0)
}

describe('edgeshard peers over --bootstrap', () => {
  let agent: RunningAgent | undefined
  afterAll(() => agent?.stop())

  it('lists an agent given by address with its device profile and round trip', async () => {
    agent = await startAgent()
    const result = await runCli(['peers', '--no-mdns', '--bootstrap', agent.address, '--timeout', '10000', '--json'])
    expect(result.code).toBe(0)
    const probes = JSON.parse(result.stdout.toString()) as Probe[]
    expect(probes.map((p) => p.address)).toEqual([agent.address])
    expectProfile(probes[0])
  }, 60_000)
})

/** Network namespaces need root and iproute2; elsewhere the mDNS test is skipped. */
function canMakeNamespaces(): boolean {
  if (process.getuid?.() !== 0) return false
  try {
    execFileSync('ip', ['netns', 'list'], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
}

const NETNS = canMakeNamespaces()
if (!NETNS) process.stderr.write('skipping the mDNS test: network namespaces need root and iproute2\n')
const tag = String(process.pid % 100_000)
const nsAgent = `es-agent-${tag}`
const nsMaster = `es-master-${tag}`
const subnet = `10.231.${process.pid % 250}`

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] })
}

/** Runs `edgeshard ...args` inside namespace `ns`. */
function runIn(ns: string, args: readonly string[], timeoutMs = 60_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('ip', ['netns', 'exec', ns, process.execPath, CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (b: Buffer) => {
      stdout += b.toString()
    })
    child.stderr.on('data', (b: Buffer) => {
      stderr += b.toString()
    })
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      reject(new Error(`edgeshard ${args.join(' ')} in ${ns} did not finish; stderr: ${stderr}`))
    }, timeoutMs)
    child.on('exit', (code) => {
      clearTimeout(timer)
      resolve({ code, stdout, stderr })
    })
  })
}

describe.skipIf(!NETNS || !HAVE_MODELS)('mDNS discovery between two network namespaces', () => {
  let agent: ChildProcess | undefined
  let agentPeer = ''

  beforeAll(async () => {
    const vethAgent = `esa${tag}`
    const vethMaster = `esm${tag}`
    ip('netns', 'add', nsAgent)
    ip('netns', 'add', nsMaster)
    ip('link', 'add', vethAgent, 'type', 'veth', 'peer', 'name', vethMaster)
    for (const [ns, dev, host] of [
      [nsAgent, vethAgent, 1],
      [nsMaster, vethMaster, 2],
    ] as const) {
      ip('link', 'set', dev, 'netns', ns)
      ip('-n', ns, 'addr', 'add', `${subnet}.${host}/24`, 'dev', dev)
      ip('-n', ns, 'link', 'set', dev, 'up')
      ip('-n', ns, 'link', 'set', 'lo', 'up')
      // mDNS multicast (224.0.0.251) goes out on the veth: the namespaces have no other route.
      ip('-n', ns, 'route', 'add', '224.0.0.0/4', 'dev', dev)
    }
    // An agent as a user starts it: no flags, so it listens on every interface and announces itself.
    agent = spawn('ip', ['netns', 'exec', nsAgent, process.execPath, CLI, 'agent', '--no-identity'], { stdio: ['ignore', 'pipe', 'inherit'] })
    agentPeer = await new Promise<string>((resolve, reject) => {
      let out = ''
      agent!.stdout!.on('data', (b: Buffer) => {
        out += b.toString()
        const match = /^listening \S+\/p2p\/(\S+)$/m.exec(out)
        if (match) resolve(match[1]!)
      })
      agent!.once('exit', (code) => reject(new Error(`agent exited with code ${code}`)))
    })
  }, 60_000)

  afterAll(async () => {
    if (agent && agent.exitCode === null && agent.signalCode === null) {
      await new Promise<void>((done) => {
        agent!.once('exit', () => done())
        agent!.kill('SIGTERM')
      })
    }
    for (const ns of [nsAgent, nsMaster]) {
      try {
        ip('netns', 'del', ns) // takes the veth pair along
      } catch {}
    }
  })

  it('`peers` in one namespace finds the agent in the other, and `run --discover` generates over it', async () => {
    const listed = await runIn(nsMaster, ['peers', '--timeout', '5000', '--json'])
    expect(listed.code, listed.stderr).toBe(0)
    const probes = JSON.parse(listed.stdout) as Probe[]
    const probe = probes.find((p) => p.peer === agentPeer)
    expectProfile(probe)
    expect(probe!.address).toBe(`/ip4/${subnet}.1/tcp/${/tcp\/(\d+)/.exec(probe!.address)![1]}/p2p/${agentPeer}`)

    const c = referenceCases()[1]! // the empty prompt, 64 positions
    const dir = mkdtempSync(join(tmpdir(), 'edgeshard-mdns-'))
    const run = await runIn(nsMaster, [
      'run',
      '--model', join(MODELS_DIR, 'stories260K.bin'),
      '--prompt', c.prompt,
      '--discover', '1',
      '--discover-timeout', '20000', // returns as soon as the agent answers
      '--max-tokens', String(c.steps - c.prompt_tokens.length + 1),
      '--temperature', '0',
      '--summary-json', join(dir, 'summary.json'),
    ])
    expect(run.code, run.stderr).toBe(0)
    expect(run.stderr).toContain(`found agent ${agentPeer} at /ip4/${subnet}.1/`)
    expect(run.stderr).toMatch(new RegExp(`worker 1 ready: peer ${agentPeer}`))
    const summary = JSON.parse(readFileSync(join(dir, 'summary.json'), 'utf8')) as { peers: number; nextTokens: number[] }
    expect(summary.peers).toBe(2)
    expect(summary.nextTokens).toEqual(c.next_tokens)
    expect(run.stdout).toBe(c.stdout)
  }, 120_000)
})
