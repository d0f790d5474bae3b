/**
 * Membership and identity, real processes on 127.0.0.1: persistent identity keys (mode 0600, loose ones
 * refused), a trust file (non-members get nothing on any edgeshard protocol, members generate the reference tokens,
 * a master refuses a non-member worker), a pre-shared key (wrong key cannot connect, right key works), and two agents
 * started from a copied key refused by the master.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import * as transport from '../../transport/index.ts'
import { type FramedChannel, TENSOR_PARALLEL_PROTOCOL, TransportNode } from '../../transport/index.ts'
import { CLI, HAVE_MODELS, MODELS_DIR, type RunningAgent, referenceCases, runCli, startAgent } from '../support/cli.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-membership-'))
const MODEL = join(MODELS_DIR, 'stories260K.bin')
const BOTTLEFIT = join(MODELS_DIR, 'fmnist-bottlefit.onnx')

/** Every edgeshard protocol id the transport exports (tp, info, split, stage, and any added later). */
const PROTOCOLS = (Object.values(transport) as unknown[]).filter((v): v is string => typeof v === 'string' && v.startsWith('/edgeshard/'))

/** Creates (or reads) the identity key `name` in the test folder; returns its path and peer id. */
async function identity(name: string): Promise<{ path: string; peer: string }> {
  const path = join(dir, name)
  const r = await runCli(['identity', '--identity', path])
  expect(r.code).toBe(0)
  return { path, peer: r.stdout.toString().trim() }
}

/** A swarm key file (libp2p pnet format), mode 0600. */
function pskFile(name: string, hexByte: string): string {
  const path = join(dir, name)
  writeFileSync(path, `/key/swarm/psk/1.0.0/\n/base16/\n${hexByte.repeat(32)}\n`, { mode: 0o600 })
  return path
}

/** Greedy generation of reference case 0 with `args`; returns the summary's next tokens, or throws with stderr. */
async function generate(tag: string, args: readonly string[]): Promise<number[]> {
  const c = referenceCases()[0]!
  const summary = join(dir, `${tag}.json`)
  const r = await runCli(['run', '--model', MODEL, '--prompt', c.prompt, '--max-tokens', String(c.steps - c.prompt_tokens.length + 1), '--temperature', '0', '--summary-json', summary, ...args])
  expect(r.stderr).not.toMatch(/\n\s+at /)
  if (r.code !== 0) throw new Error(`run ${tag} exited ${r.code}: ${r.stderr}`)
  return (JSON.parse(readFileSync(summary, 'utf8')) as { nextTokens: number[] }).nextTokens
}

/** The one error line of a failed CLI run (exit 2, no stack). */
function inputError(r: { code: number | null; stderr: string }): string {
  expect(r.code).toBe(2)
  expect(r.stderr).not.toMatch(/\n\s+at /)
  const line = r.stderr.trimEnd().split('\n').at(-1)!
  expect(line).toMatch(/^edgeshard: /)
  return line
}

afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('identity keys', () => {
  it('are created with mode 0600 on first use and keep their peer id', async () => {
    const first = await identity('id-a.key')
    expect(first.peer).toMatch(/^12D3KooW[1-9A-HJ-NP-Za-km-z]{44}$/)
    expect(statSync(first.path).mode & 0o777).toBe(0o600)
    expect((await identity('id-a.key')).peer).toBe(first.peer)
    expect((await identity('id-b.key')).peer).not.toBe(first.peer)
  })

  it('default to one key per role, so a device runs an agent and a master under two peer ids', async () => {
    // vitest.config.ts points XDG_CONFIG_HOME at a scratch folder for every test process and its children.
    const config = join(process.env.XDG_CONFIG_HOME!, 'edgeshard')
    const agent = await runCli(['identity'])
    const master = await runCli(['identity', '--role', 'master'])
    expect([agent.code, master.code]).toEqual([0, 0])
    expect(agent.stdout.toString().trim()).toMatch(/^12D3KooW/)
    expect(master.stdout.toString().trim()).toMatch(/^12D3KooW/)
    expect(master.stdout.toString().trim()).not.toBe(agent.stdout.toString().trim())
    expect(statSync(join(config, 'agent.key')).mode & 0o777).toBe(0o600)
    expect(statSync(join(config, 'master.key')).mode & 0o777).toBe(0o600)
    expect((await runCli(['identity'])).stdout.toString()).toBe(agent.stdout.toString())
  })

  it('readable by others: identity, agent and run refuse it in one line with exit code 2', async () => {
    const { path } = await identity('loose.key')
    chmodSync(path, 0o644)
    const expected = new RegExp(`identity key ${path} has mode 0644: .*chmod 600`)
    expect(inputError(await runCli(['identity', '--identity', path]))).toMatch(expected)
    expect(inputError(await runCli(['agent', '--listen', '/ip4/127.0.0.1/tcp/0', '--identity', path], { timeoutMs: 20_000 }))).toMatch(expected)
    if (HAVE_MODELS) expect(inputError(await runCli(['run', '--model', MODEL, '--peers', '1', '--identity', path]))).toMatch(expected)
  })

  it('a malformed key, trust file or swarm key is named with exit code 2', async () => {
    const junk = join(dir, 'junk.key')
    writeFileSync(junk, 'not a key', { mode: 0o600 })
    expect(inputError(await runCli(['identity', '--identity', junk]))).toMatch(`identity key ${junk} (9 bytes) is not a libp2p private key`)
    const trust = join(dir, 'bad-trust')
    writeFileSync(trust, '# members\n12D3KooWnotapeer\n')
    expect(inputError(await runCli(['agent', '--no-identity', '--trust', trust], { timeoutMs: 20_000 }))).toMatch(`trust file ${trust} line 2: '12D3KooWnotapeer' is not a peer ID`)
    const psk = join(dir, 'bad-psk')
    writeFileSync(psk, '/key/swarm/psk/1.0.0/\n/base16/\nabc\n', { mode: 0o600 })
    expect(inputError(await runCli(['agent', '--no-identity', '--psk', psk], { timeoutMs: 20_000 }))).toMatch(`pre-shared key ${psk} is not a libp2p swarm key`)
    chmodSync(psk, 0o640)
    expect(inputError(await runCli(['agent', '--no-identity', '--psk', psk], { timeoutMs: 20_000 }))).toMatch(`pre-shared key ${psk} has mode 0640`)
  })
})

/** Dials `address` on `protocol` from a node with a fresh key; returns the channel's received bytes, or the error. */
async function dialAsStranger(address: string, protocol: string): Promise<{ bytes: number; error?: Error; peer: string }> {
  const node = new TransportNode({ dialTimeoutMs: 5000 })
  await node.start()
  const peer = node.peerId
  let channel: FramedChannel | undefined
  try {
    channel = await node.dial(address, protocol)
    // Got a stream after all: ask for something and see what comes back.
    await channel.send({ type: protocol === transport.INFO_PROTOCOL ? 'info' : 'stats' }).catch(() => {})
    await channel.read({ signal: AbortSignal.timeout(2000) }).catch(() => null)
    return { bytes: channel.bytesReceived, peer }
  } catch (err) {
    return { bytes: channel?.bytesReceived ?? 0, error: err as Error, peer }
  } finally {
    await node.stop()
  }
}

describe.skipIf(!HAVE_MODELS)('a trust file', () => {
  let agent: RunningAgent
  let master: { path: string; peer: string }
  let trust: string

  beforeAll(async () => {
    master = await identity('master.key')
    const worker = await identity('worker.key')
    trust = join(dir, 'trust')
    // the same file on every device: all members, the device itself included
    writeFileSync(trust, `# edgeshard cluster\n${master.peer}  # master\n${worker.peer}\n\n`)
    agent = await startAgent(30_000, ['--identity', worker.path, '--trust', trust], { captureStderr: true })
  })
  afterAll(() => agent?.stop())

  it('gives a non-member nothing on any edgeshard protocol and logs the refusal with its peer id', async () => {
    expect(PROTOCOLS).toEqual(expect.arrayContaining(['/edgeshard/tp/1.0.0', '/edgeshard/info/1.0.0', '/edgeshard/split/1.0.0']))
    for (const protocol of PROTOCOLS) {
      const r = await dialAsStranger(agent.address, protocol)
      expect(r.bytes).toBe(0)
      expect(r.error?.name).toBe('DialError')
      await expect.poll(() => agent.stderr(), { timeout: 5000 }).toContain(`refused peer ${r.peer} from /ip4/127.0.0.1/`)
    }
    // the agent is still there for members
    expect(agent.child.exitCode).toBeNull()
  }, 60_000)

  it('admits a member: the master generates the reference tokens through the agent', async () => {
    const tokens = await generate('member', ['--workers', agent.address, '--identity', master.path, '--trust', trust])
    expect(tokens).toEqual(referenceCases()[0]!.next_tokens)
  }, 60_000)

  it('a master refuses a worker that is not in its trust file before sending it a byte', async () => {
    // A would-be worker that counts every byte it receives on the tensor-parallel protocol.
    const stranger = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
    await stranger.start()
    let streams = 0
    let bytes = 0
    await stranger.handle(TENSOR_PARALLEL_PROTOCOL, async (channel) => {
      streams++
      for await (const frame of channel) bytes += frame.body.byteLength + 1
    })
    try {
      const address = stranger.multiaddrs()[0]!
      for (const workers of [address, address.replace(/\/p2p\/.*$/, '')]) {
        const line = inputError(await runCli(['run', '--model', MODEL, '--workers', workers, '--identity', master.path, '--trust', trust]))
        expect(line).toContain(`peer ${stranger.peerId} is not a member (not in trust file ${trust})`)
      }
      expect(streams).toBe(0)
      expect(bytes).toBe(0)
    } finally {
      await stranger.stop()
    }
  }, 60_000)

  it.skipIf(!readFileExists(BOTTLEFIT))('split serve refuses a non-member too', async () => {
    const server = await startProcess(['split', 'serve', '--model', BOTTLEFIT, '--listen', '/ip4/127.0.0.1/tcp/0', '--no-identity', '--trust', trust])
    try {
      const r = await dialAsStranger(server.address, transport.SPLIT_PROTOCOL)
      expect(r.bytes).toBe(0)
      expect(r.error?.name).toBe('DialError')
      await expect.poll(() => server.stderr(), { timeout: 5000 }).toContain(`refused peer ${r.peer}`)
    } finally {
      server.child.kill('SIGTERM')
    }
  }, 60_000)
})

describe.skipIf(!HAVE_MODELS)('a pre-shared key (libp2p private network)', () => {
  let agent: RunningAgent
  const right = pskFile('swarm.key', 'a7')
  const wrong = pskFile('other.key', '5c')

  beforeAll(async () => {
    agent = await startAgent(30_000, ['--psk', right], { captureStderr: true })
  })
  afterAll(() => agent?.stop())

  it('a master with another key or none cannot connect', async () => {
    const other = await runCli(['run', '--model', MODEL, '--workers', agent.address, '--psk', wrong, '--no-identity'])
    expect(inputError(other)).toMatch(/cannot dial .* EncryptionFailedError.*same pre-shared key/)
    const stranger = await dialAsStranger(agent.address, TENSOR_PARALLEL_PROTOCOL)
    expect(stranger.error?.name).toBe('DialError')
    expect(stranger.bytes).toBe(0)
  }, 60_000)

  it('a master with the key generates the reference tokens (local workers share it too)', async () => {
    expect(await generate('psk', ['--workers', agent.address, '--psk', right, '--no-identity'])).toEqual(referenceCases()[0]!.next_tokens)
    expect(await generate('psk-local', ['--peers', '3', '--psk', right, '--no-identity'])).toEqual(referenceCases()[0]!.next_tokens)
  }, 90_000)
})

describe.skipIf(!HAVE_MODELS)('a copied identity key', () => {
  let a: RunningAgent
  let b: RunningAgent
  let key: { path: string; peer: string }

  beforeAll(async () => {
    key = await identity('shared.key')
    const copy = join(dir, 'shared-copy.key')
    copyFileSync(key.path, copy)
    chmodSync(copy, 0o600)
    ;[a, b] = await Promise.all([startAgent(30_000, ['--identity', key.path], { captureStderr: true }), startAgent(30_000, ['--identity', copy], { captureStderr: true })])
  })
  afterAll(() => Promise.all([a?.stop(), b?.stop()]))

  it('two agents with one peer id: the master refuses them naming both addresses', async () => {
    const line = inputError(await runCli(['run', '--model', MODEL, '--workers', `${a.address},${b.address}`, '--no-identity']))
    expect(line).toBe(`edgeshard: peer ID ${key.peer} is used by two agents (${a.address} and ${b.address}): copy of an identity key?`)
    // without /p2p/ in the addresses the peer id is learnt in the handshake: same verdict
    const bare = [a.address, b.address].map((x) => x.replace(/\/p2p\/.*$/, ''))
    expect(inputError(await runCli(['run', '--model', MODEL, '--workers', bare.join(','), '--no-identity']))).toContain(`peer ID ${key.peer} is used by two agents`)
  }, 60_000)

  it('a master with the same key as its worker is refused', async () => {
    const line = inputError(await runCli(['run', '--model', MODEL, '--workers', a.address, '--identity', key.path]))
    expect(line).toBe(
      `edgeshard: peer ID ${key.peer} is used by two agents (this process and the one at ${a.address}): copy of an identity key? (on one machine: give each process its own key file)`,
    )
  }, 60_000)

  it('one agent listed twice is named as such', async () => {
    const line = inputError(await runCli(['run', '--model', MODEL, '--workers', `${a.address},${a.address}`, '--no-identity']))
    expect(line).toContain(`workers 1 and 2 (${a.address} and ${a.address}) are the same agent, peer ${key.peer}: list each agent once`)
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

describe.skipIf(!canMakeNamespaces())('a copied identity key announced by mDNS', () => {
  const tag = String(process.pid % 100_000)
  const namespaces = [`es-dup-a-${tag}`, `es-dup-b-${tag}`]
  const subnet = `10.232.${process.pid % 250}`
  const children: ChildProcess[] = []
  const ip = (...args: string[]): void => {
    execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] })
  }

  beforeAll(() => {
    const veths = [`esda${tag}`, `esdb${tag}`]
    for (const ns of namespaces) ip('netns', 'add', ns)
    ip('link', 'add', veths[0]!, 'type', 'veth', 'peer', 'name', veths[1]!)
    for (const [i, ns] of namespaces.entries()) {
      ip('link', 'set', veths[i]!, 'netns', ns)
      ip('-n', ns, 'addr', 'add', `${subnet}.${i + 1}/24`, 'dev', veths[i]!)
      ip('-n', ns, 'link', 'set', veths[i]!, 'up')
      ip('-n', ns, 'link', 'set', 'lo', 'up')
      ip('-n', ns, 'route', 'add', '224.0.0.0/4', 'dev', veths[i]!)
    }
  })

  afterAll(() => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    for (const ns of namespaces) {
      try {
        ip('netns', 'del', ns)
      } catch {}
    }
  })

  it('the agent started second hears its own peer id and exits with code 2 naming both', async () => {
    const key = await identity('mdns.key')
    const copy = join(dir, 'mdns-copy.key')
    copyFileSync(key.path, copy)
    chmodSync(copy, 0o600)
    const start = (ns: string, keyPath: string): { child: ChildProcess; stderr: () => string; listening: Promise<void> } => {
      const child = spawn('ip', ['netns', 'exec', ns, process.execPath, CLI, 'agent', '--identity', keyPath], { stdio: ['ignore', 'pipe', 'pipe'] })
      children.push(child)
      let err = ''
      child.stderr!.on('data', (b: Buffer) => {
        err += b.toString()
      })
      const listening = new Promise<void>((resolve) => {
        let out = ''
        child.stdout!.on('data', (b: Buffer) => {
          out += b.toString()
          if (/^listening /m.test(out)) resolve()
        })
      })
      return { child, stderr: () => err, listening }
    }
    const first = start(namespaces[0]!, key.path)
    await first.listening
    // past the first agent's start-up window (5 s), in which it would give way itself
    await new Promise((r) => setTimeout(r, 6000))
    const second = start(namespaces[1]!, copy)
    const code = await new Promise<number | null>((resolve) => {
      const timer = setTimeout(() => resolve(-1), 20_000)
      second.child.once('exit', (c) => {
        clearTimeout(timer)
        resolve(c)
      })
    })
    expect(code, second.stderr()).toBe(2)
    expect(second.stderr()).toMatch(
      new RegExp(`^edgeshard: peer ID ${key.peer} is used by two agents \\(this one and the one at /ip4/${subnet.replaceAll('.', '\\.')}\\.1/tcp/\\d+\\): copy of an identity key\\?$`, 'm'),
    )
    // the agent that was there first keeps serving and warns
    expect(first.child.exitCode).toBeNull()
    await expect.poll(() => first.stderr(), { timeout: 15_000 }).toContain(`edgeshard agent: warning: peer ID ${key.peer} is used by two agents`)
  }, 60_000)
})

function readFileExists(path: string): boolean {
  try {
    statSync(path)
    return true
  } catch {
    return false
  }
}

/** Starts `edgeshard ...args` that prints `listening ADDR`; stderr is captured. */
function startProcess(args: readonly string[]): Promise<{ address: string; child: ChildProcess; stderr: () => string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stderr.on('data', (b: Buffer) => {
      err += b.toString()
    })
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString()
      const m = /^listening (\S+)$/m.exec(out)
      if (m) resolve({ address: m[1]!, child, stderr: () => err })
    })
    child.once('exit', (code) => reject(new Error(`edgeshard ${args[0]} exited with ${code}: ${err}`)))
  })
}
