import { randomBytes } from 'node:crypto'
import { createServer, type Server, type Socket, connect as tcpConnect } from 'node:net'
import { noise, pureJsCrypto } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import type { Connection, Libp2p, Stream } from '@libp2p/interface'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { Uint8ArrayList } from 'uint8arraylist'
import { afterEach, describe, expect, it } from 'vitest'
import { type Frame, FramedChannel, f32Body, TENSOR_PARALLEL_PROTOCOL, TransportNode } from '../../transport/index.ts'
import { nodeNoiseCrypto } from '../../transport/noise-crypto.ts'
import { randomF32, randomInt, seededRandom } from './helpers.ts'

const hex = (s: string): Uint8Array =>
  Uint8Array.from(s.replace(/[^0-9a-f]/g, '').match(/../g)!.map((h) => Number.parseInt(h, 16)))
/** Hex of bytes or of any uint8arraylist version's list (noise's crypto types use uint8arraylist 2). */
const toHex = (bytes: Uint8Array | { subarray(): Uint8Array }): string =>
  Buffer.from(bytes instanceof Uint8Array ? bytes : bytes.subarray()).toString('hex')

describe('nodeNoiseCrypto (node:crypto primitives for noise)', () => {
  it('encrypts the RFC 8439 §2.8.2 AEAD test vector', () => {
    const key = Uint8Array.from({ length: 32 }, (_, i) => 0x80 + i)
    const nonce = hex('07000000 40414243 44454647')
    const ad = hex('50515253 c0c1c2c3 c4c5c6c7')
    const plaintext = new TextEncoder().encode(
      "Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.",
    )
    const sealed = nodeNoiseCrypto.chaCha20Poly1305Encrypt(plaintext, nonce, ad, key)
    expect(toHex(sealed)).toBe(
      'd31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b1a71de0a9e06' +
        '0b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586' +
        'cec64b6116' +
        '1ae10b594f09e26a7e902ecbd0600691', // tag
    )
    expect(toHex(nodeNoiseCrypto.chaCha20Poly1305Decrypt(sealed, nonce, ad, key))).toBe(toHex(plaintext))
  })

  it('agrees with the library pure-JS crypto on seeded inputs, lists and arrays alike', () => {
    const random = seededRandom(5)
    for (let trial = 0; trial < 40; trial++) {
      const key = randomBytes(32)
      const nonce = randomBytes(12)
      const ad = randomBytes(trial % 3 === 0 ? 0 : 32)
      const plaintext = randomBytes(randomInt(random, 0, 70_000))
      const cut = randomInt(random, 0, plaintext.byteLength)
      const list = new Uint8ArrayList(plaintext.subarray(0, cut), plaintext.subarray(cut))
      const want = toHex(pureJsCrypto.chaCha20Poly1305Encrypt(plaintext, nonce, ad, key))
      expect(toHex(nodeNoiseCrypto.chaCha20Poly1305Encrypt(plaintext, nonce, ad, key))).toBe(want)
      const sealed = nodeNoiseCrypto.chaCha20Poly1305Encrypt(list as never, nonce, ad, key)
      expect(toHex(sealed)).toBe(want)
      const bytes = hex(want)
      const split = randomInt(random, 0, bytes.byteLength)
      const sealedList = new Uint8ArrayList(bytes.subarray(0, split), bytes.subarray(split))
      expect(toHex(nodeNoiseCrypto.chaCha20Poly1305Decrypt(sealedList as never, nonce, ad, key))).toBe(toHex(plaintext))
    }
    const ck = randomBytes(32)
    const ikm = randomBytes(32)
    expect(nodeNoiseCrypto.getHKDF(ck, ikm).map(toHex)).toEqual(pureJsCrypto.getHKDF(ck, ikm).map(toHex))
    const data = randomBytes(1000)
    expect(toHex(nodeNoiseCrypto.hashSHA256(data))).toBe(toHex(pureJsCrypto.hashSHA256(data)))
    const seed = randomBytes(32)
    expect(toHex(nodeNoiseCrypto.generateX25519KeyPairFromSeed(seed).publicKey)).toBe(
      toHex(pureJsCrypto.generateX25519KeyPairFromSeed(seed).publicKey),
    )
    const a = nodeNoiseCrypto.generateX25519KeyPair()
    const b = pureJsCrypto.generateX25519KeyPair()
    expect(toHex(nodeNoiseCrypto.generateX25519SharedKey(a.privateKey, b.publicKey))).toBe(
      toHex(pureJsCrypto.generateX25519SharedKey(b.privateKey, a.publicKey)),
    )
  })

  it('rejects a tampered ciphertext or tag, and a wrong key, nonce or associated data', () => {
    const key = randomBytes(32)
    const nonce = randomBytes(12)
    const ad = randomBytes(16)
    const sealed = hex(toHex(nodeNoiseCrypto.chaCha20Poly1305Encrypt(randomBytes(5000), nonce, ad, key)))
    for (const at of [0, 2500, sealed.byteLength - 1]) {
      const tampered = sealed.slice()
      tampered[at]! ^= 0x01
      expect(() => nodeNoiseCrypto.chaCha20Poly1305Decrypt(tampered, nonce, ad, key)).toThrow()
    }
    const otherKey = key.slice()
    otherKey[0]! ^= 1
    expect(() => nodeNoiseCrypto.chaCha20Poly1305Decrypt(sealed, nonce, ad, otherKey)).toThrow()
    expect(() => nodeNoiseCrypto.chaCha20Poly1305Decrypt(sealed, randomBytes(12), ad, key)).toThrow()
    expect(() => nodeNoiseCrypto.chaCha20Poly1305Decrypt(sealed, nonce, randomBytes(16), key)).toThrow()
    expect(() => nodeNoiseCrypto.chaCha20Poly1305Decrypt(sealed.subarray(0, 10), nonce, ad, key)).toThrow(RangeError)
  })

  it('uses the current bytes of a key array whose contents changed (no stale cached key)', () => {
    const key = randomBytes(32)
    const nonce = randomBytes(12)
    const plaintext = randomBytes(100)
    const empty = new Uint8Array(0)
    nodeNoiseCrypto.chaCha20Poly1305Encrypt(plaintext, nonce, empty, key) // caches the key
    key[7]! ^= 0xff
    expect(toHex(nodeNoiseCrypto.chaCha20Poly1305Encrypt(plaintext, nonce, empty, key))).toBe(
      toHex(pureJsCrypto.chaCha20Poly1305Encrypt(plaintext, nonce, empty, key)),
    )
  })
})

/** A libp2p node with the library's stock noise crypto and yamux, as another libp2p implementation would run. */
async function stockNode(listen: string[]): Promise<Libp2p> {
  return createLibp2p({
    addresses: { listen },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    connectionMonitor: { enabled: false },
  })
}

/** Frames with seeded headers and f32 bodies of 0..maxFloats values. */
function frames(seed: number, count: number, maxFloats: number): { header: { type: string; i: number }; body: Float32Array }[] {
  const random = seededRandom(seed)
  return Array.from({ length: count }, (_, i) => ({ header: { type: 'x', i }, body: randomF32(random, randomInt(random, 0, maxFloats)) }))
}

async function exchange(a: FramedChannel, b: FramedChannel, seed: number): Promise<void> {
  const sent = frames(seed, 40, 40_000) // up to 160 KB: several noise messages per frame
  const received: Frame[] = []
  const reading = (async () => {
    for await (const frame of b) {
      received.push(frame)
      if (received.length === sent.length) return
    }
  })()
  for (const f of sent) await a.send(f.header, f.body)
  await reading
  received.forEach((frame, i) => {
    expect(frame.header).toEqual(sent[i]!.header)
    expect(f32Body(frame)).toEqual(sent[i]!.body)
  })
}

describe('TransportNode (native noise crypto) interoperates with stock libp2p noise', () => {
  const cleanups: (() => Promise<void>)[] = []
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0)) await cleanup()
  })

  it('handshakes and exchanges frames both ways, dialling and being dialled', async () => {
    const ours = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
    await ours.start()
    const theirs = await stockNode(['/ip4/127.0.0.1/tcp/0'])
    cleanups.push(
      () => ours.stop(),
      async () => {
        await theirs.stop()
      },
    )
    const ourInbound = Promise.withResolvers<FramedChannel>()
    await ours.handle(TENSOR_PARALLEL_PROTOCOL, (channel) => ourInbound.resolve(channel))
    const theirInbound = Promise.withResolvers<FramedChannel>()
    await theirs.handle(TENSOR_PARALLEL_PROTOCOL, (stream: Stream, connection: Connection) => {
      theirInbound.resolve(new FramedChannel(stream, connection))
    })

    // stock dials ours
    const connection = await theirs.dial(multiaddr(ours.multiaddrs()[0]!))
    const theirOutbound = new FramedChannel(await connection.newStream(TENSOR_PARALLEL_PROTOCOL), connection)
    const ourSide = await ourInbound.promise
    await exchange(theirOutbound, ourSide, 1)
    await exchange(ourSide, theirOutbound, 2)

    // ours dials stock
    const ourOutbound = await ours.dial(theirs.getMultiaddrs()[0]!.toString(), TENSOR_PARALLEL_PROTOCOL)
    const theirSide = await theirInbound.promise
    await exchange(ourOutbound, theirSide, 3)
    await exchange(theirSide, ourOutbound, 4)
  })
})

/** A TCP proxy that can flip one bit in the next large chunk it forwards from the dialler to the listener. */
class TamperingProxy {
  private readonly server: Server
  private readonly sockets = new Set<Socket>()
  tamperNext = false
  tampered = false

  constructor(targetPort: number) {
    this.server = createServer((inbound) => {
      const outbound = tcpConnect({ host: '127.0.0.1', port: targetPort })
      this.sockets.add(inbound).add(outbound)
      inbound.on('data', (chunk: Buffer) => {
        if (this.tamperNext && chunk.byteLength > 1000) {
          this.tamperNext = false
          this.tampered = true
          chunk[chunk.byteLength >> 1]! ^= 0x10
        }
        outbound.write(chunk)
      })
      outbound.on('data', (chunk: Buffer) => inbound.write(chunk))
      for (const [a, b] of [
        [inbound, outbound],
        [outbound, inbound],
      ] as const) {
        a.on('close', () => b.destroy())
        a.on('error', () => b.destroy())
      }
    })
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve))
    return (this.server.address() as { port: number }).port
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy()
    await new Promise<void>((resolve) => this.server.close(() => resolve()))
  }
}

describe('a tampered connection', () => {
  const cleanups: (() => Promise<void>)[] = []
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0)) await cleanup()
  })

  it('is torn down: no altered frame is delivered, the channel ends with PeerGoneError', async () => {
    const server = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
    const client = new TransportNode()
    await Promise.all([server.start(), client.start()])
    cleanups.push(
      () => client.stop(),
      () => server.stop(),
    )
    const received: Frame[] = []
    const ended = Promise.withResolvers<unknown>()
    await server.handle(TENSOR_PARALLEL_PROTOCOL, async (channel) => {
      try {
        for await (const frame of channel) received.push(frame)
        ended.resolve(undefined)
      } catch (err) {
        ended.resolve(err)
      }
    })
    const serverAddress = server.multiaddrs()[0]!
    const proxy = new TamperingProxy(Number(serverAddress.split('/')[4]))
    cleanups.push(() => proxy.close())
    const proxyPort = await proxy.listen()
    const channel = await client.dial(`/ip4/127.0.0.1/tcp/${proxyPort}/p2p/${server.peerId}`, TENSOR_PARALLEL_PROTOCOL)
    const bodies = Array.from({ length: 4 }, (_, i) => new Float32Array(4096).fill(i + 0.5))
    for (const [i, body] of bodies.slice(0, 3).entries()) await channel.send({ type: 'x', i }, body)
    await expect.poll(() => received.length).toBe(3)
    proxy.tamperNext = true
    await channel.send({ type: 'x', i: 3 }, bodies[3]!).catch(() => {})
    const error = await ended.promise
    expect(proxy.tampered).toBe(true)
    expect(error).toMatchObject({ name: 'PeerGoneError' })
    expect(received).toHaveLength(3)
    received.forEach((frame, i) => {
      expect(frame.header).toEqual({ type: 'x', i })
      expect(f32Body(frame)).toEqual(bodies[i])
    })
  })
})
