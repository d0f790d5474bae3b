import { type ChildProcess, spawn } from 'node:child_process'
import { createServer, type Server, type Socket } from 'node:net'
import { fileURLToPath } from 'node:url'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { afterEach, describe, expect, it } from 'vitest'
import {
  encodeFrame,
  f32Body,
  type Frame,
  type FramedChannel,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
  type TransportNodeOptions,
} from '../../transport/index.ts'
import { randomInt, seededRandom } from './helpers.ts'

const P = TENSOR_PARALLEL_PROTOCOL
const cleanups: (() => Promise<unknown> | unknown)[] = []
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup()
})

async function startNode(options: TransportNodeOptions = {}): Promise<TransportNode> {
  const node = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'], ...options })
  await node.start()
  cleanups.push(() => node.stop())
  return node
}

function dial(from: TransportNode, to: TransportNode): Promise<FramedChannel> {
  return from.dial(to.multiaddrs()[0]!, P, { signal: AbortSignal.timeout(10_000) })
}

/** Resolves with the first inbound channel of `node`. */
function nextInbound(node: TransportNode): Promise<FramedChannel> {
  const { promise, resolve } = Promise.withResolvers<FramedChannel>()
  void node.handle(P, resolve)
  return promise
}

/** How an async iteration ended: null = normally, else the error. */
async function drain(
  channel: FramedChannel,
  onFrame: (f: Frame) => void | Promise<void> = () => {},
): Promise<Error | null> {
  try {
    for await (const frame of channel) await onFrame(frame)
    return null
  } catch (err) {
    return err as Error
  }
}

/** Seeded body size in f32 for frame i: some 0, five 4.4 MB, the rest up to 12 KB. */
function floatsOf(random: () => number, i: number): number {
  if (i % 200 === 100) return 1_100_000
  if (i % 9 === 0) return 0
  return randomInt(random, 1, 3000)
}

function bodyFor(seed: number, i: number, n: number): Float32Array {
  const body = new Float32Array(n)
  for (let k = 0; k < n; k++) body[k] = seed * 1e6 + i * 7919 + k
  return body
}

/** Sends `count` frames, returns nothing; the peer checks them with `checkFrames`. */
async function sendFrames(channel: FramedChannel, seed: number, count: number): Promise<void> {
  const random = seededRandom(seed)
  for (let i = 0; i < count; i++) {
    const n = floatsOf(random, i)
    await channel.send({ type: 'data', i, n }, bodyFor(seed, i, n))
  }
}

/** Reads `count` frames and checks order, lengths, alignment and every value. Returns the number of bad frames. */
async function checkFrames(channel: FramedChannel, seed: number, count: number): Promise<number> {
  const random = seededRandom(seed)
  let bad = 0
  for (let i = 0; i < count; i++) {
    const frame = await channel.read()
    if (frame === null) throw new Error(`channel ended after ${i} frames`)
    const n = floatsOf(random, i)
    const values = f32Body(frame)
    let ok = frame.header.i === i && frame.header.n === n && values.length === n && frame.body.byteOffset % 8 === 0
    for (let k = 0; ok && k < n; k++) ok = values[k] === Math.fround(seed * 1e6 + i * 7919 + k)
    if (!ok) bad++
  }
  return bad
}

describe('FramedChannel over libp2p on 127.0.0.1', () => {
  it('carries 1000 frames each way, f32 bodies of 0 B to 4.4 MB, intact and in order', async () => {
    const a = await startNode()
    const b = await startNode()
    const inbound = nextInbound(a)
    const client = await dial(b, a)
    const server = await inbound
    expect(client.remotePeer).toBe(a.peerId)
    expect(server.remotePeer).toBe(b.peerId)
    expect(client.remoteAddr).toContain('/tcp/')
    const [, , badAtServer, badAtClient] = await Promise.all([
      sendFrames(client, 1, 1000),
      sendFrames(server, 2, 1000),
      checkFrames(server, 1, 1000),
      checkFrames(client, 2, 1000),
    ])
    expect(badAtServer).toBe(0)
    expect(badAtClient).toBe(0)
    // graceful close both ways: iterators end normally, closed resolves
    const serverEnd = drain(server)
    await client.close()
    expect(await serverEnd).toBeNull()
    await server.close()
    expect(await drain(client)).toBeNull()
    await expect(client.closed).resolves.toBeUndefined()
    await expect(server.closed).resolves.toBeUndefined()
  })

  it('applies backpressure: a sender blocks while the receiver does not read, then everything arrives', async () => {
    const a = await startNode({ maxQueuedBytes: 1 << 20 })
    const b = await startNode()
    const inbound = nextInbound(a)
    const client = await dial(b, a)
    const server = await inbound
    const body = new Float32Array(1 << 18) // 1 MiB
    let sent = 0
    const sender = (async () => {
      for (let i = 0; i < 64; i++) {
        body[0] = i
        await client.send({ type: 'chunk', i }, body.slice())
        sent++
      }
    })()
    await new Promise((resolve) => setTimeout(resolve, 1500))
    // 64 MiB offered; at most ~ the receive queue (1 MiB) + yamux window (≤ 16 MiB) + one frame in flight
    expect(sent).toBeLessThan(40)
    for (let i = 0; i < 64; i++) {
      const frame = await server.read()
      expect(frame?.header.i).toBe(i)
      expect(f32Body(frame!)[0]).toBe(i)
    }
    await sender
    expect(sent).toBe(64)
  })

  it('keeps frames contiguous under concurrent sends; refuses reserved types and sends after close', async () => {
    const a = await startNode()
    const b = await startNode()
    const inbound = nextInbound(a)
    const client = await dial(b, a)
    const server = await inbound
    const random = seededRandom(5)
    const sizes = Array.from({ length: 60 }, (_, i) => (i % 10 === 0 ? 600_000 : randomInt(random, 0, 5000)))
    await Promise.all(sizes.map((n, i) => client.send({ type: 'c', i, n }, bodyFor(9, i, n))))
    const seen = new Set<number>()
    for (let j = 0; j < sizes.length; j++) {
      const frame = (await server.read())!
      const i = frame.header.i as number
      const values = f32Body(frame)
      expect(values.length).toBe(sizes[i])
      expect(values).toEqual(bodyFor(9, i, sizes[i]!))
      seen.add(i)
    }
    expect(seen.size).toBe(sizes.length)
    await expect(client.send({ type: '$close' })).rejects.toThrow(TypeError)
    await client.close()
    await expect(client.send({ type: 'late' })).rejects.toMatchObject({ name: 'ChannelClosedError' })
    expect(await server.read()).toBeNull()
  })

  it('ends the iterator with PeerGoneError naming the peer when the remote node stops', async () => {
    const a = await startNode()
    const b = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
    await b.start()
    const inbound = nextInbound(a)
    const client = await dial(b, a)
    const server = await inbound
    await client.send({ type: 'hello' })
    const ended = drain(server)
    const bPeer = b.peerId
    await b.stop()
    const err = await ended
    expect(err?.name).toBe('PeerGoneError')
    expect(err?.message).toContain(bPeer)
    await expect(server.closed).rejects.toMatchObject({ name: 'PeerGoneError' })
    await expect(server.send({ type: 'late' })).rejects.toMatchObject({ name: 'PeerGoneError' })
  })

  it('ends the iterator with PeerGoneError when the remote process dies (SIGKILL)', async () => {
    const a = await startNode()
    const fixture = fileURLToPath(new URL('./fixtures/echo-peer.ts', import.meta.url))
    const child: ChildProcess = spawn(process.execPath, [fixture], { stdio: ['ignore', 'pipe', 'inherit'] })
    cleanups.push(() => child.kill('SIGKILL'))
    const address = await new Promise<string>((resolve, reject) => {
      let out = ''
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString()
        if (out.includes('\n')) resolve(out.trim())
      })
      child.on('exit', (code) => reject(new Error(`echo peer exited with ${code}`)))
    })
    const channel = await a.dial(address, P, { signal: AbortSignal.timeout(10_000) })
    await channel.send({ type: 'ping', n: 1 }, new Float32Array([1, 2, 3]))
    const echo = await channel.read()
    expect(echo?.header).toEqual({ type: 'ping', n: 1 })
    expect(Array.from(f32Body(echo!))).toEqual([1, 2, 3])
    const ended = drain(channel)
    child.kill('SIGKILL')
    const err = await ended
    expect(err?.name).toBe('PeerGoneError')
    expect(err?.message).toContain(channel.remotePeer)
  })

  it('aborts a stream carrying a malformed frame with FrameError and keeps serving other channels', async () => {
    const a = await startNode()
    const endings: Promise<Error | null>[] = []
    const firstFrames: Frame[] = []
    await a.handle(P, (channel) => {
      endings.push(
        drain(channel, (frame) => {
          firstFrames.push(frame)
          channel.send({ type: 'echo', of: frame.header.type }, frame.body).catch(() => {})
        }),
      )
    })
    // a raw libp2p peer writes bytes that are not a frame
    const raw = await createLibp2p({
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      connectionMonitor: { enabled: false },
    })
    cleanups.push(() => raw.stop())
    const stream = await raw.dialProtocol(multiaddr(a.multiaddrs()[0]!), P, { signal: AbortSignal.timeout(10_000) })
    const rawClosed = new Promise<Error | undefined>((resolve) =>
      stream.addEventListener('close', (evt) => resolve(evt.error)),
    )
    for (const part of encodeFrame({ type: 'valid' }, new Uint8Array(8))) stream.send(part)
    const garbage = new Uint8Array(16)
    new DataView(garbage.buffer).setUint32(0, 4, true) // 4-byte header: not msgpack of an object
    garbage.set([0xff, 0xff, 0xff, 0xff], 8)
    stream.send(garbage)
    expect((await rawClosed)?.name).toBe('StreamResetError')
    const ending = await endings[0]!
    expect(ending?.name).toBe('FrameError')
    expect(firstFrames.map((f) => f.header.type)).toEqual(['valid'])
    // the node still serves a second channel
    const b = await startNode()
    const second = await dial(b, a)
    await second.send({ type: 'again' }, new Float32Array([4, 5]))
    const echo = await second.read()
    expect(echo?.header).toEqual({ type: 'echo', of: 'again' })
    expect(Array.from(f32Body(echo!))).toEqual([4, 5])
  })

  it('rejects a dial to a closed port with DialError naming the address', async () => {
    const a = await startNode()
    const b = await startNode()
    const server: Server = createServer()
    const port = await new Promise<number>((resolve) =>
      server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)),
    )
    await new Promise((resolve) => server.close(resolve))
    for (const address of [`/ip4/127.0.0.1/tcp/${port}/p2p/${b.peerId}`, `/ip4/127.0.0.1/tcp/${port}`]) {
      const err = await a.dial(address, P, { signal: AbortSignal.timeout(5000) }).catch((e: Error) => e)
      expect((err as Error).name).toBe('DialError')
      expect((err as Error).message).toContain(address)
    }
  })

  it('rejects a dial that does not complete within the signal timeout with DialError', async () => {
    const a = await startNode()
    const b = await startNode()
    // a TCP server that accepts and never answers the handshake
    const sockets: Socket[] = []
    const server: Server = createServer((s) => sockets.push(s))
    const port = await new Promise<number>((resolve) =>
      server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)),
    )
    cleanups.push(
      () =>
        new Promise((resolve) => {
          for (const s of sockets) s.destroy()
          server.close(resolve)
        }),
    )
    const address = `/ip4/127.0.0.1/tcp/${port}/p2p/${b.peerId}`
    const start = performance.now()
    const err = await a.dial(address, P, { signal: AbortSignal.timeout(300) }).catch((e: Error) => e)
    expect((err as Error).name).toBe('DialError')
    expect((err as Error).message).toContain(address)
    expect(performance.now() - start).toBeLessThan(5000)
  })

  it('rejects a dial for a protocol the remote does not handle with DialError', async () => {
    const a = await startNode()
    const b = await startNode()
    await a.handle(P, () => {})
    const err = await b
      .dial(a.multiaddrs()[0]!, '/edgeshard/unknown/1.0.0', { signal: AbortSignal.timeout(5000) })
      .catch((e: Error) => e)
    expect((err as Error).name).toBe('DialError')
  })
})
