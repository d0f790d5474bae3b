import { rm } from 'node:fs/promises'
import { logger } from '@libp2p/logger'
import { formatLayers, type LayerShardWeights, type LinearWeight, type TensorParallelPlan } from '../splitter/index.ts'
import {
  type AllreduceLink,
  f32Body,
  type FramedChannel,
  LinkShaper,
  STAGE_PROTOCOL,
  StarAllreduceMember,
  TENSOR_PARALLEL_PROTOCOL,
  TransportNode,
  type TransportNodeOptions,
  type WireDtype,
} from '../transport/index.ts'
import { join } from 'node:path'
import { memoryUsage } from './memory.ts'
import { type ForwardHeader, StageLeader, StageMember, StageRegistry, type StageRole, type StageSession } from './stage-worker.ts'
import { type EmulatedLink, type MasterMessage, ProtocolError, parseMasterMessage, tensorBodyBytes, VECTOR_NAMES, type WeightName, type WorkerStats } from './protocol.ts'
import { defaultShardDir, kvCacheBytes } from './shard-encoding.ts'
import { serveSurvey } from './link-survey.ts'
import { deviceProfile, serveInfo } from './peer-info.ts'
import { checkAllreduceFrame, checkForwardFrame, ShardIntake } from './shard-intake.ts'
import { allreduceTag, type ForwardTimings, ShardRunner } from './shard-runner.ts'
import { TraceRecorder, traceReceive, tracedLink, wallClockMs } from './trace.ts'
import { openShard, ShardFileWriter } from './weight-store.ts'

const log = logger('edgeshard:agent:worker')

/** Errors that name another peer that went away, stalled or failed (a worker reports those and stays). */
const LOSS_ERRORS: ReadonlySet<string> = new Set(['PeerGoneError', 'PeerStalledError', 'PeerFailedError'])

/** The master gave up on the passes of an epoch (`abort`): they end with this, which is not reported. */
class SessionAbortedError extends Error {
  static override name = 'SessionAbortedError'
  constructor(message: string) {
    super(message)
    this.name = 'SessionAbortedError'
  }
}

/** Options of a worker agent. */
export interface WorkerOptions {
  /** Multiaddrs to listen on, e.g. `/ip4/127.0.0.1/tcp/0`. */
  readonly listen: readonly string[]
  /**
   * Called when a master's session ends (normally or not); `error` is set when it failed. A session that ends
   * after the master's `bye`, or because this agent is stopping (`stop()`), ends normally: losing the stream then
   * loses nothing.
   */
  readonly onSessionEnd?: (peer: string, error?: Error) => void
  /**
   * Bytes for this agent's weights and KV cache. A shard larger than that is stored on local disk and streamed
   * through a sliding window of half-layer blocks (TPI-LLM §3.3). Default: all resident.
   */
  readonly memoryBudgetBytes?: number
  /** Where shard files go in sliding-window mode (default: a folder under the OS temp dir). */
  readonly shardDir?: string
  /** Announce this agent on the LAN by mDNS so masters and `edgeshard peers` find it. Default false. */
  readonly mdns?: boolean
  /**
   * Identity, membership (trust set, pre-shared key) and duplicate-key reporting of the agent's libp2p node (see
   * TransportNodeOptions). Default: a fresh key, anyone admitted.
   */
  readonly transport?: Pick<TransportNodeOptions, 'privateKey' | 'membership' | 'onSelfDiscovered'>
  /**
   * Loads this device's cached measurement (for its present CPU quota) or measures it now, and publishes it, for a
   * master's survey (agent/link-survey.ts). Absent: the agent refuses to measure.
   */
  readonly measure?: () => Promise<{ readonly cached: boolean }>
}

/**
 * A worker agent: listens for masters on the tensor-parallel protocol, receives a plan and its shard of the weights,
 * and executes forward passes in lockstep with the master (star allreduce with the master as hub). One master at a
 * time is served per stream; a malformed frame ends that master's session with an `error` frame and the agent keeps
 * listening.
 */
export class WorkerAgent {
  readonly #node: TransportNode
  readonly #options: WorkerOptions
  /** Masters being served now. */
  #sessions = 0
  /** Set by `stop()`: sessions cut off by our own node stopping are not failures of theirs. */
  #stopping = false
  /** Members of stages without the master, waiting for their leader. */
  readonly #stages = new StageRegistry()
  /** Emulated links to other peers (`edgeshard emulate`), by peer id: every channel to that peer is shaped. */
  readonly #shapers = new Map<string, LinkShaper>()

  constructor(options: WorkerOptions) {
    this.#options = options
    this.#node = new TransportNode({
      listen: [...options.listen],
      ...(options.mdns ? { mdns: { announce: true } } : {}),
      linkShaper: (peer) => this.#shapers.get(peer),
      ...options.transport,
    })
  }

  async start(): Promise<void> {
    await this.#node.start()
    await this.#node.handle(TENSOR_PARALLEL_PROTOCOL, async (channel) => {
      this.#sessions++
      try {
        await this.#serve(channel)
      } finally {
        this.#sessions--
      }
    })
    await this.#node.handle(STAGE_PROTOCOL, (channel) => this.#stages.accept(channel))
    await serveInfo(this.#node, () => deviceProfile(this.#sessions > 0))
    await serveSurvey(this.#node, { shapers: this.#shapers, ...(this.#options.measure ? { measure: this.#options.measure } : {}) })
  }

  /** Full multiaddrs (with `/p2p/<peer id>`) masters can dial. */
  multiaddrs(): string[] {
    return this.#node.multiaddrs()
  }

  get peerId(): string {
    return this.#node.peerId
  }

  async stop(): Promise<void> {
    this.#stopping = true
    await this.#node.stop()
  }

  async #serve(channel: FramedChannel): Promise<void> {
    const peer = channel.remotePeer
    log('master %s connected', peer)
    // Tracing (the plan says so): allreduce sends go through a traced link; otherwise straight to the channel.
    let tracer: TraceRecorder | undefined
    let hubLink: AllreduceLink = channel
    // Element type of the partials sent to the master: the plan's (f32 until a plan says otherwise).
    let wireDtype: WireDtype = 'f32'
    const newMember = (): StarAllreduceMember =>
      new StarAllreduceMember({ peer: channel.peer, send: (header, body) => hubLink.send(header, body) }, { wireDtype })
    // One allreduce member per epoch: `abort` fails the old one (its passes are stale) and starts a fresh one; so does
    // a plan with another wire dtype.
    let member = newMember()
    let plan: TensorParallelPlan | null = null
    let shardIndex = 0
    let threads = 1
    let layersPerGraph: number | undefined
    let layers: Partial<Record<WeightName, LinearWeight>>[] = []
    let received = 0
    /** Checks of the current plan's shard load: every tensor and load-done is validated against the plan. */
    let intake: ShardIntake | null = null
    let runner: ShardRunner | null = null
    let writer: ShardFileWriter | null = null
    let shardDir = ''
    let overheadBytes = 0
    let forwards = 0
    const timings: ForwardTimings = { computeMs: 0, allreduceMs: 0, ioWaitMs: 0 }
    let work: Promise<void> = Promise.resolve()
    let failure: Error | undefined
    // Pipeline and hybrid plans: the worker's part in a stage without the master (null: member of the master's stage).
    let stage: StageRole | null = null
    let links: readonly EmulatedLink[] = []
    // Recovery: the master's epoch, the first step of its passes (earlier `forward`/`ar` frames are stale),
    // and whether a pass failed because of another worker (passes are then dropped until the master's `abort`).
    let epoch = 0
    let firstStep = 0
    let broken = false
    let peerDeadlineMs: number | undefined
    let heartbeat: ReturnType<typeof setInterval> | undefined
    const fail = (err: Error): void => {
      if (failure) return
      // A peer other than the master that caused the failure (a stage member gone) is named for the master.
      const culprit = (err as { peer?: unknown }).peer
      if (typeof culprit === 'string' && culprit !== peer && LOSS_ERRORS.has(err.name)) {
        // Another worker failed us: report it and wait for the master to re-plan (`abort`) rather than end the session.
        if (broken) return
        broken = true
        log.error('session with %s: peer %s failed: %s', peer, culprit, err.message)
        void channel.send({ type: 'error', message: err.message, errorName: err.name, peer: culprit }).catch(() => {})
        return
      }
      // This agent is stopping and cuts the stream itself: what fails then is not the session's fault.
      if (this.#stopping) return
      failure = err
      log.error('session with %s failed: %s', peer, err.message)
      member.fail(err)
      void stage?.close(err)
      void channel
        .send({ type: 'error', message: err.message, errorName: err.name, ...(typeof culprit === 'string' && culprit !== peer ? { peer: culprit } : {}) })
        .catch(() => {})
        .finally(() => channel.close().catch(() => {}))
    }
    const queueForward = (header: ForwardHeader, x: Float32Array): void => {
      if (broken || header.step < firstStep) return // a stale pass, or one the master will abort
      const r = runner
      if (!r) throw new RangeError('forward before the shard was loaded')
      if (x.length !== header.seq * r.plan.model.dim) {
        throw new RangeError(`forward of ${header.seq} positions needs ${header.seq * r.plan.model.dim} values, got ${x.length}`)
      }
      const role = stage
      const at = epoch
      work = work.then(async () => {
        await role?.beforeForward(header, x)
        await r.forward(x, header.pos0, header.step, role?.allreduce ?? member, timings, tracer)
        forwards++
        await role?.afterForward(header, x)
      })
      // A pass of an aborted epoch failed because the master gave up on it: not an error of this session.
      work.catch((err: unknown) => {
        if (at === epoch) fail(err as Error)
      })
    }
    const queueReset = (): void => {
      const r = runner
      const role = stage
      work = work.then(async () => {
        await role?.reset() // a leader relays it, in order with the passes it relays
        r?.reset()
      })
    }
    /** `abort`: drop the passes in flight; keep the shard (KV cache emptied), or drop it and the stage role. */
    const abort = async (next: { epoch: number; step: number; keep?: boolean }): Promise<void> => {
      const reason = new SessionAbortedError(`master ${peer} aborted epoch ${epoch} for epoch ${next.epoch}`)
      epoch = next.epoch
      firstStep = next.step
      broken = false
      const old = member
      member = newMember()
      old.fail(reason)
      const role = next.keep ? null : stage
      if (!next.keep) stage = null
      await role?.close(reason)
      await work.catch(() => {})
      work = Promise.resolve()
      if (next.keep && runner) {
        // A pass cut short left some layers' caches longer than others: start the sequence again.
        runner.reset()
        await channel.send({ type: 'aborted', epoch })
        return
      }
      if (writer) await writer.finish().catch(() => {})
      writer = null
      intake = null
      layers = []
      received = 0
      await runner?.release()
      runner = null
      await channel.send({ type: 'aborted', epoch })
    }
    /** A heartbeat: `ping` whenever nothing else left for `intervalMs` (the master tells silence from a long pass). */
    const startHeartbeat = (intervalMs: number): void => {
      clearInterval(heartbeat)
      let sent = channel.bytesSent
      let changedAt = performance.now()
      heartbeat = setInterval(() => {
        const now = performance.now()
        if (channel.bytesSent !== sent) {
          sent = channel.bytesSent
          changedAt = now
        } else if (now - changedAt >= intervalMs) {
          changedAt = now
          void channel.send({ type: 'ping' }).catch(() => {})
        }
      }, intervalMs / 4)
      heartbeat.unref()
    }
    const session = (): StageSession => ({ node: this.#node, master: channel, tracer, queueForward, queueReset, fail })
    try {
      frames: for await (const frame of channel) {
        if (failure) break
        if (tracer) traceReceive(tracer, frame.header, frame.body.byteLength, peer)
        if (frame.header.type === 'ar') {
          // Sums of an aborted epoch's passes may still arrive: their tags are below the first step's.
          const tag = frame.header.tag
          if (plan && firstStep > 0 && typeof tag === 'number' && tag >= 0 && tag < allreduceTag(firstStep, plan.model.nLayers, 0, 0)) continue
          checkAllreduceFrame(frame, runner?.plan)
          member.deliver(frame)
          continue
        }
        const msg = parseMasterMessage(frame.header)
        switch (msg.type) {
          case 'plan':
            intake = new ShardIntake(msg.plan, msg.shardIndex, {
              threads: msg.threads,
              wireDtype: msg.wireDtype,
              ...(this.#options.memoryBudgetBytes === undefined ? {} : { memoryBytes: this.#options.memoryBudgetBytes }),
            })
            if (intake.wireDtype !== wireDtype) {
              wireDtype = intake.wireDtype
              const old = member
              member = newMember()
              old.fail(new Error(`the plan of master ${peer} changed the wire dtype to ${wireDtype}`))
            }
            if (writer) await writer.finish().catch(() => {}) // a load cut short by a new plan: close its file
            writer = null
            plan = msg.plan
            shardIndex = msg.shardIndex
            threads = msg.threads
            layersPerGraph = msg.layersPerGraph
            tracer = msg.trace ? new TraceRecorder() : undefined
            hubLink = tracer ? tracedLink(channel, tracer) : channel
            layers = Array.from({ length: plan.model.nLayers }, () => ({}))
            received = 0
            links = msg.links ?? []
            peerDeadlineMs = msg.peerDeadlineMs
            await stage?.close()
            stage =
              msg.role === 'leader'
                ? new StageLeader(session(), msg.stageId!, { wireDtype, ...(peerDeadlineMs === undefined ? {} : { peerDeadlineMs, model: msg.plan.model }) })
                : msg.role === 'stage-member'
                  ? new StageMember(session(), this.#stages, msg.stageId!, shardIndex, { wireDtype })
                  : null
            if (msg.heartbeatMs !== undefined) startHeartbeat(msg.heartbeatMs)
            if (this.#options.memoryBudgetBytes !== undefined) {
              shardDir = join(this.#options.shardDir ?? defaultShardDir('worker'), `shard-${shardIndex}`)
              writer = await ShardFileWriter.create(shardDir)
            }
            break
          case 'tensor': {
            if (!plan || !intake) throw new ProtocolError('frame tensor before the plan')
            intake.tensor(msg, frame.body.byteLength)
            const layer = layers[msg.layer]
            const { start, count } = plan.layers
            if (!layer || msg.layer < start || msg.layer >= start + count) {
              throw new RangeError(`tensor for layer ${msg.layer}: the plan runs ${formatLayers(start, count)}`)
            }
            if (writer) {
              const expected = tensorBodyBytes(msg.bits, msg.rows, msg.cols)
              if (frame.body.byteLength !== expected) throw new RangeError(`tensor ${msg.name}: ${frame.body.byteLength} bytes, expected ${expected}`)
              await writer.add(msg.layer, msg.name, msg.bits, msg.rows, msg.cols, frame.body)
            } else {
              layer[msg.name] = receivedWeight(msg, frame.body)
            }
            received++
            break
          }
          case 'load-done': {
            if (!plan || !intake) throw new ProtocolError('frame load-done before the plan')
            intake.loadDone(msg.tensors)
            if (msg.tensors !== received) throw new RangeError(`load-done announces ${msg.tensors} tensors, received ${received}`)
            await runner?.release()
            if (writer) {
              await writer.finish()
              writer = null
              const store = await openShard(shardDir, { budgetBytes: this.#options.memoryBudgetBytes!, kvCacheBytes: kvCacheBytes(plan, shardIndex), quantizedMatmul: plan.quantizedMatmul })
              runner = await ShardRunner.create(plan, shardIndex, store, { threads, lowMemory: true })
            } else {
              runner = await ShardRunner.create(plan, shardIndex, layers.map(toLayerWeights), { threads, ...(layersPerGraph !== undefined ? { layersPerGraph } : {}) })
            }
            layers = []
            overheadBytes = memoryUsage().rssBytes
            // Emulated links apply from here on: loading the weights is not what the emulation measures.
            for (const l of links) this.#shapers.set(l.peer, new LinkShaper(l))
            await channel.send({ type: 'ready', shardIndex })
            log('shard %d ready for %s', shardIndex, peer)
            break
          }
          case 'stage': {
            if (!(stage instanceof StageLeader)) throw new RangeError('stage frame to a worker that does not lead a stage')
            await stage.connect(msg.members)
            await channel.send({ type: 'stage-ready' })
            break
          }
          case 'forward':
            if (msg.step < firstStep || broken) break // a pass of an aborted epoch, or one the master will abort
            if (stage instanceof StageMember) throw new RangeError('forward from the master to a stage member: passes come from its leader')
            checkForwardFrame(msg, frame.body.byteLength, runner?.plan)
            queueForward(msg, f32Body(frame))
            break
          case 'abort':
            if (msg.epoch <= epoch) throw new ProtocolError(`frame abort: epoch ${msg.epoch} does not follow epoch ${epoch}`)
            if (msg.step < firstStep) throw new ProtocolError(`frame abort: step ${msg.step} is before step ${firstStep}`)
            await abort(msg)
            break
          case 'reset':
            queueReset()
            break
          case 'stats': {
            await work.catch(() => {})
            const stats: WorkerStats = {
              forwards,
              ...timings,
              window: runner?.weights.window ?? 0,
              ...memoryUsage(),
              overheadBytes,
            }
            await channel.send({ type: 'stats', ...stats })
            break
          }
          case 'trace': {
            const receivedMs = wallClockMs()
            await work.catch(() => {})
            const recorded = tracer?.take() ?? { timeOriginMs: performance.timeOrigin, spans: [] }
            const body = new TextEncoder().encode(JSON.stringify(recorded.spans))
            await channel.send({ type: 'trace', timeOriginMs: recorded.timeOriginMs, receivedMs, sentMs: wallClockMs() }, body)
            break
          }
          case 'bye':
            // The session is over: close our half and stop reading. Whatever then ends the stream (the master's close
            // frame, its node stopping, ours) loses nothing.
            await work.catch(() => {})
            await channel.close().catch(() => {})
            break frames
        }
      }
    } catch (err) {
      fail(err as Error)
    } finally {
      clearInterval(heartbeat)
      member.fail(failure ?? new Error(`master ${peer} ended the session`))
      await work.catch(() => {})
      await stage?.close(failure)
      for (const l of links) this.#shapers.delete(l.peer)
      await runner?.release()
      // The shard on disk belongs to this session's plan: a default directory goes with it.
      if (shardDir && this.#options.shardDir === undefined) await rm(shardDir, { recursive: true, force: true }).catch(() => {})
      // a master that ended gracefully without `bye` would otherwise leave our half of the stream open for good
      await channel.close().catch(() => {})
      log('master %s disconnected', peer)
      this.#options.onSessionEnd?.(peer, failure)
    }
  }
}

/**
 * A weight from a `tensor` frame body (layout in protocol.ts), as views on the body.
 * @throws RangeError when the body size does not match the header.
 */
function receivedWeight(msg: Extract<MasterMessage, { type: 'tensor' }>, body: Uint8Array): LinearWeight {
  const { bits, rows, cols, name } = msg
  const expected = tensorBodyBytes(bits, rows, cols)
  if (body.byteLength !== expected) throw new RangeError(`tensor ${name}: ${body.byteLength} bytes, ${rows}×${cols} at ${bits} bits needs ${expected}`)
  if (bits === 32) return { bits, rows, cols, data: new Float32Array(body.buffer, body.byteOffset, rows * cols) }
  if (VECTOR_NAMES.has(name)) throw new RangeError(`tensor ${name}: vectors are sent as f32, got ${bits} bits`)
  const blobBytes = (rows * cols * bits) / 8
  // The frame body is 8-byte aligned and the blob length is a multiple of 4 (cols is a multiple of 32).
  return {
    bits,
    rows,
    cols,
    blob: body.subarray(0, blobBytes),
    scales: new Float32Array(body.buffer, body.byteOffset + blobBytes, (rows * cols) / 32),
  }
}

function toLayerWeights(w: Partial<Record<WeightName, LinearWeight>>, layer: number): LayerShardWeights {
  const has = (names: readonly WeightName[]): boolean => {
    const present = names.filter((n) => w[n] !== undefined).length
    if (present !== 0 && present !== names.length) {
      throw new RangeError(`layer ${layer}: incomplete weights, got ${names.filter((n) => w[n]).join(', ')}`)
    }
    return present === names.length
  }
  const vec = (n: WeightName): Float32Array => {
    const t = w[n]!
    if (t.bits !== 32) throw new RangeError(`layer ${layer}: ${n} must be f32`)
    return t.data
  }
  const attention = has(['attn_norm', 'wq', 'wk', 'wv', 'wo'])
    ? {
        attn_norm: vec('attn_norm'),
        wq: w.wq!,
        wk: w.wk!,
        wv: w.wv!,
        wo: w.wo!,
        bias: has(['bq', 'bk', 'bv']) ? { bq: vec('bq'), bk: vec('bk'), bv: vec('bv') } : null,
      }
    : null
  const ffn = has(['ffn_norm', 'w1', 'w3', 'w2']) ? { ffn_norm: vec('ffn_norm'), w1: w.w1!, w3: w.w3!, w2: w.w2! } : null
  return { attention, ffn }
}
