// Must stay first: sets the environment onnxruntime-node reads as it loads.
import './ort-environment.ts'
import ort from 'onnxruntime-node'
import { RuntimeError } from './errors.ts'

/** Typed arrays a session accepts and returns, and their ONNX element types. */
export type HostData = Float32Array | BigInt64Array | Uint8Array | Int8Array | Int32Array

/** A tensor fed to or read from a session: typed data with its shape (outermost first). */
export interface HostTensor {
  readonly data: HostData
  readonly dims: readonly number[]
}

function ortType(data: HostData): 'float32' | 'int64' | 'uint8' | 'int8' | 'int32' {
  if (data instanceof Float32Array) return 'float32'
  if (data instanceof BigInt64Array) return 'int64'
  if (data instanceof Uint8Array) return 'uint8'
  if (data instanceof Int8Array) return 'int8'
  return 'int32'
}

/** Options shared by every session an agent creates. */
export interface RuntimeOptions {
  /** ORT intra-op threads (default 1: peers on one board share its cores). */
  readonly threads?: number
  /** No memory arena or pattern planning: intermediate buffers are freed after each run (sliding-window mode). */
  readonly lowMemory?: boolean
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
        ...(options.lowMemory ? { enableCpuMemArena: false, enableMemPattern: false } : {}),
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
      ortFeeds[name] = new ort.Tensor(ortType(t.data), t.data, t.dims)
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
      out[name] = { data: tensor.data as HostData, dims: tensor.dims }
    }
    return out
  }

  /** Releases the native session. */
  async release(): Promise<void> {
    await this.#session.release()
  }
}

/** Element types {@link TypedSession} feeds and returns (onnxruntime's names). */
export type TypedElementType =
  | 'float32'
  | 'float16'
  | 'float64'
  | 'int8'
  | 'uint8'
  | 'int16'
  | 'uint16'
  | 'int32'
  | 'uint32'
  | 'int64'
  | 'uint64'
  | 'bool'

/** Data of a typed tensor: float16 is carried as its raw bits (Uint16Array), bool as Uint8Array (0/1). */
export type TypedData =
  | Float32Array
  | Float64Array
  | Int8Array
  | Uint8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | BigInt64Array
  | BigUint64Array

/** A tensor with its element type: `data` holds the product of `dims` elements, row-major (outermost first). */
export interface TypedTensor {
  readonly type: TypedElementType
  readonly data: TypedData
  readonly dims: readonly number[]
}

/** Options of {@link TypedSession.create}. */
export interface TypedSessionOptions extends RuntimeOptions {
  /** External-data files the model references, by `location` (ONNX external data), with their bytes in memory. */
  readonly externalData?: readonly { readonly path: string; readonly data: Uint8Array }[]
  /** onnxruntime graph optimisation level (default 'all'). */
  readonly optimizationLevel?: 'disabled' | 'basic' | 'extended' | 'all'
  /** Checked before and after loading (onnxruntime cannot stop a load midway). */
  readonly signal?: AbortSignal
}

/**
 * A session over an arbitrary ONNX model held in memory (split heads and tails, profiling runs): feeds and results of
 * any numeric element type, and external data supplied as bytes. Intra-op spinning is off as for {@link Session}.
 * Feeds are checked against `inputNames`; unknown or missing names are refused before onnxruntime sees them.
 */
export class TypedSession {
  readonly #session: ort.InferenceSession
  readonly #name: string

  private constructor(name: string, session: ort.InferenceSession) {
    this.#name = name
    this.#session = session
  }

  /**
   * Loads `model` (ONNX protobuf bytes).
   * @throws RuntimeError naming the graph when onnxruntime rejects the model (or an external file is missing)
   */
  static async create(name: string, model: Uint8Array, options: TypedSessionOptions = {}): Promise<TypedSession> {
    options.signal?.throwIfAborted()
    let created: TypedSession
    try {
      const session = await ort.InferenceSession.create(model, {
        intraOpNumThreads: options.threads ?? 1,
        interOpNumThreads: 1,
        executionMode: 'sequential',
        graphOptimizationLevel: options.optimizationLevel ?? 'all',
        extra: { session: { intra_op: { allow_spinning: '0' }, inter_op: { allow_spinning: '0' } } },
        ...(options.externalData ? { externalData: options.externalData.map((f) => ({ path: f.path, data: f.data })) } : {}),
      })
      created = new TypedSession(name, session)
    } catch (err) {
      throw new RuntimeError(`cannot load graph ${name} into onnxruntime: ${oneLine((err as Error).message)}`, { cause: err })
    }
    if (options.signal?.aborted) {
      await created.release()
      options.signal.throwIfAborted()
    }
    return created
  }

  get inputNames(): readonly string[] {
    return this.#session.inputNames
  }

  get outputNames(): readonly string[] {
    return this.#session.outputNames
  }

  /**
   * Runs the graph on `feeds` (every input, nothing else) and returns `outputs` (all by default).
   * onnxruntime cannot stop a run midway: `signal` is checked before and after it.
   * @throws RuntimeError naming the graph and the missing or unknown input, or onnxruntime's failure; `signal.reason`
   */
  async run(
    feeds: Readonly<Record<string, TypedTensor>>,
    options: { readonly outputs?: readonly string[]; readonly signal?: AbortSignal } = {},
  ): Promise<Record<string, TypedTensor>> {
    options.signal?.throwIfAborted()
    const missing = this.#session.inputNames.filter((n) => !(n in feeds))
    if (missing.length > 0) throw new RuntimeError(`cannot run graph ${this.#name}: missing inputs ${missing.join(', ')}`)
    const ortFeeds: Record<string, ort.Tensor> = {}
    for (const [name, t] of Object.entries(feeds)) {
      if (!this.#session.inputNames.includes(name)) {
        throw new RuntimeError(`cannot run graph ${this.#name}: it has no input ${name} (inputs: ${this.#session.inputNames.join(', ')})`)
      }
      ortFeeds[name] = new ort.Tensor(t.type, t.data as never, t.dims)
    }
    let result: ort.InferenceSession.OnnxValueMapType
    try {
      result = options.outputs ? await this.#session.run(ortFeeds, [...options.outputs]) : await this.#session.run(ortFeeds)
    } catch (err) {
      throw new RuntimeError(`graph ${this.#name} failed in onnxruntime: ${oneLine((err as Error).message)}`, { cause: err })
    }
    options.signal?.throwIfAborted()
    const out: Record<string, TypedTensor> = {}
    for (const [name, value] of Object.entries(result)) {
      const tensor = value as ort.Tensor
      let data = tensor.data as unknown
      if (tensor.type === 'float16' && !(data instanceof Uint16Array)) {
        const view = data as ArrayBufferView
        data = new Uint16Array(view.buffer, view.byteOffset, view.byteLength / 2)
      }
      out[name] = { type: tensor.type as TypedElementType, data: data as TypedData, dims: tensor.dims }
    }
    return out
  }

  /** Releases the native session. */
  async release(): Promise<void> {
    await this.#session.release()
  }
}

function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, ' ')
}

/** Version of onnxruntime-node in use, e.g. '1.30.0' (for an agent's device profile). */
export function runtimeVersion(): string {
  return ort.env.versions.node ?? ort.env.versions.common
}
