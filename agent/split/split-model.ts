/**
 * One ONNX model prepared for split computing on this peer: its bytes and external data in memory, the graph
 * analysis, a probing run that observes every tensor, candidate cuts, and head/tail sessions built from memory.
 */
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { dirname, isAbsolute, join, normalize } from 'node:path'
import { logger } from '@libp2p/logger'
import {
  analyzeGraph,
  type CutCandidate,
  type CutDim,
  crossingTensor,
  cutModel,
  decodeModel,
  exposeAllTensors,
  externalDataLocations,
  type GraphAnalysis,
  listCandidates,
  ModelFormatError,
  type ModelCut,
  type Observation,
  type ObservedTensor,
} from '../../splitter/index.ts'
import { TypedSession, type TypedSessionOptions, type TypedTensor } from '../runtime.ts'

const log = logger('edgeshard:split')

/** Cuts kept in memory per model (a cut holds two serialised graphs). */
const CUT_CACHE_SIZE = 8

/** A graph input or output: name, element type and dims (symbolic names for dynamic ones, null when unknown). */
export interface TensorSpec {
  readonly name: string
  readonly type: TypedTensor['type']
  readonly dims: readonly CutDim[]
}

/** Options of {@link SplitModel.load}. */
export interface SplitModelOptions {
  /** onnxruntime intra-op threads of every session (default 1). */
  readonly threads?: number
  readonly signal?: AbortSignal
}

/** What one probing run returns: the observation (types and shapes) and every tensor's value. */
export interface ProbeResult {
  readonly observation: Observation
  readonly values: Readonly<Record<string, TypedTensor>>
}

/**
 * A model ready to be cut. Heads, tails and the full model load into onnxruntime from memory, with the model's
 * external-data files (read once from beside the model file) passed as bytes.
 */
export class SplitModel {
  /** The model file, or a label for a model from memory. */
  readonly path: string
  readonly bytes: Uint8Array
  /** sha256 of the model bytes (hex): head and tail peers check they hold the same model. */
  readonly sha256: string
  readonly analysis: GraphAnalysis
  readonly externalData: readonly { readonly path: string; readonly data: Uint8Array }[]
  readonly inputs: readonly TensorSpec[]
  readonly outputs: readonly TensorSpec[]
  readonly #threads: number
  readonly #cuts = new Map<string, ModelCut>()
  #probe: Promise<TypedSession> | undefined
  #full: Promise<TypedSession> | undefined

  private constructor(path: string, bytes: Uint8Array, externalData: SplitModel['externalData'], threads: number) {
    this.path = path
    this.bytes = bytes
    this.sha256 = createHash('sha256').update(bytes).digest('hex')
    this.analysis = analyzeGraph(decodeModel(bytes, path))
    this.externalData = externalData
    this.#threads = threads
    const spec = (name: string): TensorSpec => {
      const t = this.analysis.declared.has(name) ? crossingTensor(this.analysis, name) : undefined
      if (!t) throw new ModelFormatError(path, `graph input/output ${name} has no declared tensor type`)
      return { name, type: t.type, dims: t.dims }
    }
    this.inputs = this.analysis.inputs.map(spec)
    this.outputs = this.analysis.outputs.map(spec)
  }

  /**
   * Reads an ONNX model and the external-data files it references (relative to its folder).
   * @throws ModelFormatError when the file or an external-data file is missing or the bytes are not ONNX
   */
  static async load(path: string, options: SplitModelOptions = {}): Promise<SplitModel> {
    let bytes: Uint8Array
    try {
      bytes = await readFile(path, options.signal ? { signal: options.signal } : {})
    } catch (err) {
      throw new ModelFormatError(path, `cannot read file: ${(err as Error).message}`, { cause: err })
    }
    const locations = externalDataLocations(decodeModel(bytes, path))
    const externalData = []
    for (const location of locations) {
      const file = normalize(join(dirname(path), location))
      if (isAbsolute(location) || location.split(/[\\/]/).includes('..')) {
        throw new ModelFormatError(path, `external data location ${location} leaves the model's folder`)
      }
      try {
        externalData.push({ path: location, data: await readFile(file, options.signal ? { signal: options.signal } : {}) })
      } catch (err) {
        throw new ModelFormatError(path, `cannot read external data ${file}: ${(err as Error).message}`, { cause: err })
      }
    }
    log('loaded %s (%d bytes, %d external files)', path, bytes.byteLength, externalData.length)
    return new SplitModel(path, bytes, externalData, options.threads ?? 1)
  }

  /** A model from memory (`externalData` maps each external `location` to its bytes). */
  static fromBytes(label: string, bytes: Uint8Array, options: { externalData?: SplitModel['externalData']; threads?: number } = {}): SplitModel {
    return new SplitModel(label, bytes, options.externalData ?? [], options.threads ?? 1)
  }

  /** Compute nodes of the main graph. */
  get nodeCount(): number {
    return this.analysis.nodes.length
  }

  /** A session over `model` bytes (a head, tail or the full model) with this model's external data. */
  async session(name: string, model: Uint8Array, options: Pick<TypedSessionOptions, 'optimizationLevel' | 'signal'> = {}): Promise<TypedSession> {
    return TypedSession.create(name, model, { threads: this.#threads, externalData: this.externalData, ...options })
  }

  /** The whole model as one session (cached). */
  fullSession(): Promise<TypedSession> {
    this.#full ??= this.session(`${this.path} (full)`, this.bytes)
    return this.#full
  }

  /**
   * Runs the model once on `feeds` with every compute tensor fetched: the observation sizes each candidate cut and
   * types each crossing tensor; `values` holds every tensor (inputs included).
   */
  async probe(feeds: Readonly<Record<string, TypedTensor>>, options: { signal?: AbortSignal } = {}): Promise<ProbeResult> {
    this.#probe ??= this.session(`${this.path} (probe)`, exposeAllTensors(this.analysis).model)
    const session = await this.#probe
    const values: Record<string, TypedTensor> = { ...(await session.run(feeds, options.signal ? { signal: options.signal } : {})), ...feeds }
    const first = this.inputs[0]?.name
    const batch = first !== undefined ? (feeds[first]?.dims[0] ?? 1) : 1
    const tensors = new Map<string, ObservedTensor>()
    for (const [name, t] of Object.entries(values)) tensors.set(name, { type: t.type, dims: t.dims })
    return { observation: { batch, tensors }, values }
  }

  /** Every candidate cut, from an observation of {@link probe}. */
  candidates(observation: Observation): CutCandidate[] {
    return listCandidates(this.analysis, observation)
  }

  /** The model cut at `crossing` (cached by the tensor list). @throws CutError and its kin for an invalid cut */
  cut(crossing: readonly string[], observation?: Observation): ModelCut {
    const key = crossing.join('\u0000')
    let cut = this.#cuts.get(key)
    if (!cut) {
      cut = cutModel(this.analysis, crossing, observation ? { observation } : {})
      this.#cuts.set(key, cut)
      if (this.#cuts.size > CUT_CACHE_SIZE) this.#cuts.delete(this.#cuts.keys().next().value!)
    }
    return cut
  }

  /** Releases the cached sessions. */
  async release(): Promise<void> {
    const sessions = [this.#probe, this.#full]
    this.#probe = undefined
    this.#full = undefined
    for (const s of sessions) await (await s?.catch(() => undefined))?.release()
  }
}
