/**
 * The sliding window's background loader (TPI-LLM §3.3) on its own thread: reads a shard block from disk into a
 * window slot and checks its CRC-32 there, so neither the copy out of the kernel nor the checksum (≈ 0.3–0.5 ms per
 * MB with zlib) runs on the agent's event loop, where it would delay allreduce replies and compute of the current
 * block. Slots are SharedArrayBuffers that onnxruntime reads in place once a load is reported done.
 *
 * One load at a time, in the order asked: blocks are consecutive in the file and the window wants them in that order.
 */
import { closeSync, openSync, readSync } from 'node:fs'
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads'
import { crc32 } from 'node:zlib'

/** What the thread is given at start. */
interface LoaderData {
  /** The shard's blocks.bin. */
  readonly path: string
  /** The window's slots, shared with the agent's thread. */
  readonly slots: readonly SharedArrayBuffer[]
}

/** One load: `bytes` bytes at file offset `offset` into the start of slot `slot`. */
interface LoadRequest {
  readonly id: number
  readonly slot: number
  readonly offset: number
  readonly bytes: number
  /** Compute the CRC-32 of what was read. */
  readonly crc: boolean
}

/** The thread's answer: bytes read (fewer than asked at the end of the file) and their CRC-32 when asked for. */
type LoadReply = { readonly id: number; readonly bytesRead: number; readonly crc: number | null } | { readonly id: number; readonly error: string }

/** Result of {@link BlockLoader.load}. */
export interface LoadResult {
  /** Bytes read: the block's size unless the file ended first. */
  readonly bytesRead: number
  /** CRC-32 (zlib's, ISO-HDLC) of the bytes read, or null when not asked for. */
  readonly crc: number | null
}

/**
 * A thread that loads blocks of one shard file into shared window slots.
 * @example
 * const loader = await BlockLoader.start('/shards/s1/blocks.bin', 4, 1 << 24)
 * const { bytesRead, crc } = await loader.load(0, 0, 1 << 20, true) // block at offset 0 into slot 0
 */
export class BlockLoader {
  /** The window's slots: `count` SharedArrayBuffers of `slotBytes` each. */
  readonly slots: readonly SharedArrayBuffer[]
  readonly #path: string
  readonly #worker: Worker
  readonly #pending = new Map<number, { resolve: (r: LoadResult) => void; reject: (e: Error) => void }>()
  #nextId = 0
  #failure: Error | null = null

  /**
   * Starts the thread and waits until it has opened the file (so its memory is part of what the agent measures as
   * its runtime overhead from then on).
   * @param path the shard's blocks.bin (opened by the thread, read only)
   * @param count window slots
   * @param slotBytes bytes per slot (the largest block)
   * @throws Error naming the file when the thread cannot open it
   */
  static async start(path: string, count: number, slotBytes: number): Promise<BlockLoader> {
    const loader = new BlockLoader(path, count, slotBytes)
    try {
      await new Promise<void>((resolve, reject) => loader.#pending.set(-1, { resolve: () => resolve(), reject }))
    } catch (err) {
      await loader.close()
      throw err
    }
    return loader
  }

  private constructor(path: string, count: number, slotBytes: number) {
    this.#path = path
    this.slots = Array.from({ length: count }, () => new SharedArrayBuffer(slotBytes))
    this.#worker = new Worker(new URL(import.meta.url), { workerData: { path, slots: this.slots } satisfies LoaderData })
    this.#worker.on('message', (reply: LoadReply) => {
      const p = this.#pending.get(reply.id)
      if (!p) return
      this.#pending.delete(reply.id)
      if ('error' in reply) p.reject(new Error(reply.error))
      else p.resolve({ bytesRead: reply.bytesRead, crc: reply.crc })
    })
    const fail = (err: Error): void => {
      this.#failure = new Error(`the block loader of ${path} stopped: ${err.message}`)
      for (const p of this.#pending.values()) p.reject(this.#failure)
      this.#pending.clear()
    }
    this.#worker.on('error', fail)
    this.#worker.on('exit', (code) => fail(new Error(`exit code ${code}`)))
  }

  /**
   * Reads `bytes` bytes at file offset `offset` into the start of slot `slot`.
   * @param crc also compute their CRC-32
   * @throws Error naming the file when the read fails or the thread has stopped
   */
  load(slot: number, offset: number, bytes: number, crc: boolean): Promise<LoadResult> {
    if (this.#failure) return Promise.reject(this.#failure)
    if (!(slot >= 0 && slot < this.slots.length) || bytes > this.slots[slot]!.byteLength) {
      return Promise.reject(new RangeError(`cannot load ${bytes} bytes into slot ${slot} of ${this.#path}'s window`))
    }
    const id = this.#nextId++
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject })
      this.#worker.postMessage({ id, slot, offset, bytes, crc } satisfies LoadRequest)
    })
  }

  /** Stops the thread (loads still queued are rejected). */
  async close(): Promise<void> {
    this.#worker.removeAllListeners('exit')
    await this.#worker.terminate()
    const closed = new Error(`the block loader of ${this.#path} is closed`)
    for (const p of this.#pending.values()) p.reject(closed)
    this.#pending.clear()
    this.#failure = closed
  }
}

/** The thread's side: one file descriptor, loads answered in order. */
function serve(data: LoaderData): void {
  let fd: number
  try {
    fd = openSync(data.path, 'r')
  } catch (err) {
    parentPort!.postMessage({ id: -1, error: `cannot open ${data.path}: ${(err as Error).message}` } satisfies LoadReply)
    return
  }
  parentPort!.postMessage({ id: -1, bytesRead: 0, crc: null } satisfies LoadReply)
  parentPort!.on('message', (req: LoadRequest) => {
    try {
      const target = new Uint8Array(data.slots[req.slot]!, 0, req.bytes)
      let done = 0
      while (done < req.bytes) {
        const n = readSync(fd, target, done, req.bytes - done, req.offset + done)
        if (n === 0) break
        done += n
      }
      parentPort!.postMessage({ id: req.id, bytesRead: done, crc: req.crc ? crc32(target.subarray(0, done)) : null } satisfies LoadReply)
    } catch (err) {
      parentPort!.postMessage({ id: req.id, error: `cannot read ${data.path}: ${(err as Error).message}` } satisfies LoadReply)
    }
  })
  parentPort!.on('close', () => closeSync(fd))
}

if (!isMainThread && (workerData as Partial<LoaderData> | undefined)?.slots) serve(workerData as LoaderData)
