/** Shared helpers of the transport tests: a seeded PRNG and a star-allreduce cluster on 127.0.0.1. */
import {
  type FramedChannel,
  PeerGoneError,
  StarAllreduceHub,
  StarAllreduceMember,
  type StarAllreduceOptions,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
} from '../../transport/index.ts'

export { seededRandom } from '../support/random.ts'

/** Uniform integer in [lo, hi]. */
export function randomInt(random: () => number, lo: number, hi: number): number {
  return lo + Math.floor(random() * (hi - lo + 1))
}

/** [n] f32 of seeded values in [-1, 1) with varied magnitudes (so f32 rounding order matters). */
export function randomF32(random: () => number, n: number): Float32Array {
  const out = new Float32Array(n)
  for (let k = 0; k < n; k++) out[k] = (random() * 2 - 1) * 10 ** randomInt(random, -3, 3)
  return out
}

/** Reference sum: f32 additions in the given order, skipping nulls. */
export function referenceSum(partials: readonly (Float32Array | null)[], n: number): Float32Array {
  const out = new Float32Array(n)
  let first = true
  for (const p of partials) {
    if (p === null) continue
    for (let k = 0; k < n; k++) out[k] = first ? p[k]! : Math.fround(out[k]! + p[k]!)
    first = false
  }
  return out
}

/** A master (hub) and workers (members) on 127.0.0.1, wired like the agent: the master dials every worker. */
export interface StarCluster {
  readonly master: TransportNode
  readonly workers: TransportNode[]
  readonly hub: StarAllreduceHub
  readonly members: StarAllreduceMember[]
  /** Master-side channel to each worker, in member order. */
  readonly channels: FramedChannel[]
  stop(): Promise<void>
}

/** @param options - allreduce options of the hub and every member (e.g. `wireDtype`) */
export async function startStarCluster(nWorkers: number, options: StarAllreduceOptions = {}): Promise<StarCluster> {
  const master = new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] })
  const workers = Array.from({ length: nWorkers }, () => new TransportNode({ listen: ['/ip4/127.0.0.1/tcp/0'] }))
  await Promise.all([master.start(), ...workers.map((w) => w.start())])
  const memberPromises = workers.map(async (worker) => {
    const ready = Promise.withResolvers<StarAllreduceMember>()
    await worker.handle(TENSOR_PARALLEL_PROTOCOL, async (channel) => {
      const member = new StarAllreduceMember(channel, options)
      ready.resolve(member)
      try {
        for await (const frame of channel) if (frame.header.type === 'ar') member.deliver(frame)
        member.fail(new PeerGoneError(channel.remotePeer))
      } catch (err) {
        member.fail(err)
      }
    })
    return ready.promise
  })
  const channels: FramedChannel[] = []
  for (const worker of workers) {
    channels.push(await master.dial(worker.multiaddrs()[0]!, TENSOR_PARALLEL_PROTOCOL, { signal: AbortSignal.timeout(10_000) }))
  }
  const hub = new StarAllreduceHub(channels, options)
  channels.forEach((channel, i) => {
    void (async () => {
      try {
        for await (const frame of channel) if (frame.header.type === 'ar') hub.deliver(i, frame)
        hub.fail(i, new PeerGoneError(channel.remotePeer))
      } catch (err) {
        hub.fail(i, err)
      }
    })()
  })
  const members = await Promise.all(memberPromises)
  return {
    master,
    workers,
    hub,
    members,
    channels,
    async stop() {
      await Promise.all([master.stop(), ...workers.map((w) => w.stop())])
    },
  }
}
