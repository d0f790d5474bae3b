import { WorkerAgent } from '../../agent/worker.ts'
import { type Frame, type FramedChannel, TENSOR_PARALLEL_PROTOCOL, TransportNode } from '../../transport/index.ts'

/** A real worker agent on 127.0.0.1 and the test as its master over one tensor-parallel stream. */
export interface WorkerSession {
  readonly worker: WorkerAgent
  readonly channel: FramedChannel
  /** How each session the worker ended did (undefined: cleanly). */
  readonly ended: (Error | undefined)[]
  /** Heartbeats skipped by {@link next} so far. */
  readonly pings: number
  /** The next frame that is not a heartbeat (waits at most 10 s). */
  next(): Promise<Frame>
  stop(): Promise<void>
}

/** Starts a worker agent and dials it as a master. */
export async function startWorkerSession(): Promise<WorkerSession> {
  const ended: (Error | undefined)[] = []
  const worker = new WorkerAgent({ listen: ['/ip4/127.0.0.1/tcp/0'], onSessionEnd: (_peer, error) => ended.push(error) })
  await worker.start()
  const master = new TransportNode({ listen: [] })
  await master.start()
  const channel = await master.dial(worker.multiaddrs()[0]!, TENSOR_PARALLEL_PROTOCOL, { fresh: true })
  let pings = 0
  return {
    worker,
    channel,
    ended,
    get pings() {
      return pings
    },
    async next() {
      for (;;) {
        const frame = await channel.read({ signal: AbortSignal.timeout(10_000) })
        if (frame === null) throw new Error('the worker closed the stream')
        if (frame.header.type !== 'ping') return frame
        pings++
      }
    },
    async stop() {
      await channel.close().catch(() => {})
      await master.stop()
      await worker.stop()
    },
  }
}
