import ort from 'onnxruntime-node'
import { RuntimeError } from './errors.ts'

/** A tensor fed to or read from a session: f32 or int64 data with its shape (outermost first). */
export interface HostTensor {
  readonly data: Float32Array | BigInt64Array
  readonly dims: readonly number[]
}

/** Options shared by every session an agent creates. */
export interface RuntimeOptions {
  /** ORT intra-op threads (default 1: peers on one board share its cores). */
  readonly threads?: number
}

/**
 * The only module that imports onnxruntime-node. A session built from an in-memory ONNX model; feeds are checked
 * against `session.inputNames` before each run, and inputs are passed without copying (ORT reads the buffers).
 *
 * Sessions are created with intra-op spinning off: on small boards spinning threads starve the event loop that
 * carries the allreduce (../shared/NOTES.md, "ORT thread spinning").
 */
export class Session {
  readonly #session: ort.InferenceSession
  readonly #name: string

  private constructor(name: string, session: ort.InferenceSession) {
    this.#name = name
    this.#session = session
  }

  /**
   * Loads `model` (ONNX protobuf bytes).
   * @throws RuntimeError naming the graph when ORT rejects the model.
   */
  static async create(name: string, model: Uint8Array, options: RuntimeOptions = {}): Promise<Session> {
    try {
      const session = await ort.InferenceSession.create(model, {
        intraOpNumThreads: options.threads ?? 1,
        interOpNumThreads: 1,
        executionMode: 'sequential',
        graphOptimizationLevel: 'all',
        extra: { session: { intra_op: { allow_spinning: '0' }, inter_op: { allow_spinning: '0' } } },
      })
      return new Session(name, session)
    } catch (err) {
      throw new RuntimeError(`cannot load graph ${name} into onnxruntime: ${(err as Error).message}`, { cause: err })
    }
  }

  get inputNames(): readonly string[] {
    return this.#session.inputNames
  }

  /**
   * Runs the graph. Every declared input must be fed; extra feeds are refused.
   * @returns the requested outputs (all outputs by default) as host tensors.
   * @throws RuntimeError naming the graph and the missing or unknown input, or ORT's failure.
   */
  async run(feeds: Readonly<Record<string, HostTensor>>, outputs?: readonly string[]): Promise<Record<string, HostTensor>> {
    const missing = this.#session.inputNames.filter((n) => !(n in feeds))
    if (missing.length > 0) throw new RuntimeError(`cannot run graph ${this.#name}: missing inputs ${missing.join(', ')}`)
    const ortFeeds: Record<string, ort.Tensor> = {}
    for (const [name, t] of Object.entries(feeds)) {
      if (!this.#session.inputNames.includes(name)) {
        throw new RuntimeError(`cannot run graph ${this.#name}: it has no input ${name} (inputs: ${this.#session.inputNames.join(', ')})`)
      }
      ortFeeds[name] = new ort.Tensor(t.data instanceof Float32Array ? 'float32' : 'int64', t.data, t.dims)
    }
    let result: ort.InferenceSession.OnnxValueMapType
    try {
      result = outputs ? await this.#session.run(ortFeeds, [...outputs]) : await this.#session.run(ortFeeds)
    } catch (err) {
      throw new RuntimeError(`graph ${this.#name} failed in onnxruntime: ${(err as Error).message}`, { cause: err })
    }
    const out: Record<string, HostTensor> = {}
    for (const [name, value] of Object.entries(result)) {
      const tensor = value as ort.Tensor
      out[name] = { data: tensor.data as Float32Array | BigInt64Array, dims: tensor.dims }
    }
    return out
  }

  /** Releases the native session. */
  async release(): Promise<void> {
    await this.#session.release()
  }
}
