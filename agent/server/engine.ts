/**
 * What the OpenAI-compatible server needs of the master: prompt and chat encoding, and one generation at a time.
 */
import { basename } from 'node:path'
import type { Cluster } from '../cluster.ts'
import { generate, type StopReason } from '../generate.ts'
import { type ChatMessage, renderChat } from '../tokenizer/chat-template.ts'
import { HfTokenizer } from '../tokenizer/hf-tokenizer.ts'
import type { MasterTokenizer } from '../tokenizer/load-tokenizer.ts'

/** Options of one generation. */
export interface EngineGenerateOptions {
  readonly maxTokens: number
  readonly temperature: number
  readonly topP: number
  readonly seed: number
  readonly ignoreEos: boolean
  /** Bytes of each generated token, in order (the prompt is not echoed). */
  readonly onText: (bytes: Uint8Array) => void
  /** True ends generation after the current token (a stop sequence matched). */
  readonly shouldStop: () => boolean
  readonly signal: AbortSignal
}

/** Outcome of one generation. */
export interface EngineResult {
  /** Tokens whose text was produced (a final BOS/EOS not counted). */
  readonly completionTokens: number
  readonly stopReason: StopReason
  /** Peers in the cluster when the generation ended, the master included (absent: not a cluster). */
  readonly peers?: number
}

/** A model the server can run: the cluster behind it, or a stand-in in tests. */
export interface CompletionEngine {
  /** The id clients pass as `model`. */
  readonly modelId: string
  /** Positions in the context: prompt plus generated tokens. */
  readonly contextLength: number
  /** Token ids of a completion prompt, BOS first. */
  encodePrompt(text: string): number[]
  /**
   * Token ids of a chat: the model's chat template when it has one, else `role: content` lines and `assistant:`.
   * Errors: ChatTemplateError when the template fails (e.g. roles do not alternate).
   */
  encodeChat(messages: readonly ChatMessage[]): number[]
  /** Generates from `promptTokens`. Errors: the signal's reason when aborted; PeerFailedError when a peer fails. */
  generate(promptTokens: readonly number[], options: EngineGenerateOptions): Promise<EngineResult>
}

/**
 * The engine of a running cluster. Text is the tokens' exact bytes (`pieceBytes`, NUL bytes dropped), so UTF-8 split
 * over byte-fallback tokens comes out whole; run.c's printing rules (which drop such bytes) are for the CLI only.
 */
export class ClusterEngine implements CompletionEngine {
  readonly modelId: string
  readonly #cluster: Cluster
  readonly #tokenizer: MasterTokenizer
  readonly #beforeGenerate: ((signal: AbortSignal) => Promise<void>) | undefined

  /**
   * @param options.beforeGenerate - runs before each generation, once the previous one is over (e.g. admitting
   *   workers that came back, see rejoin.ts); what it throws fails the request
   */
  constructor(cluster: Cluster, tokenizer: MasterTokenizer, options: { modelId?: string; beforeGenerate?: (signal: AbortSignal) => Promise<void> } = {}) {
    this.#cluster = cluster
    this.#tokenizer = tokenizer
    this.modelId = options.modelId ?? modelIdOf(cluster.model.path)
    this.#beforeGenerate = options.beforeGenerate
  }

  get contextLength(): number {
    return this.#cluster.plan.model.maxSeqLen
  }

  encodePrompt(text: string): number[] {
    return this.#tokenizer.encode(text)
  }

  encodeChat(messages: readonly ChatMessage[]): number[] {
    const model = this.#cluster.model
    const tok = this.#tokenizer
    if (model.chatTemplate === undefined) {
      return tok.encode(`${messages.map((m) => `${m.role}: ${m.content}`).join('\n')}\nassistant:`)
    }
    if (tok instanceof HfTokenizer) {
      // The template writes BOS itself; the tokenizer turns special-token text into ids.
      const text = renderChat(model.chatTemplate, messages, {
        bosToken: tok.bosId >= 0 ? tok.decode([tok.bosId]) : '',
        eosToken: tok.eosId >= 0 ? tok.decode([tok.eosId]) : '',
        source: model.path,
      })
      return tok.encode(text, { bos: false })
    }
    // A sentencepiece vocabulary does not parse special-token text: BOS is added as an id instead.
    return tok.encode(renderChat(model.chatTemplate, messages, { source: model.path }))
  }

  async generate(promptTokens: readonly number[], options: EngineGenerateOptions): Promise<EngineResult> {
    await this.#beforeGenerate?.(options.signal)
    const tok = this.#tokenizer
    const codec = {
      bosId: tok.bosId,
      eosId: tok.eosId,
      encode: (text: string) => tok.encode(text),
      printedBytes: (prev: number, token: number) => withoutNul(tok.pieceBytes(prev, token)),
    }
    const result = await generate(this.#cluster, codec, promptTokens, {
      maxTokens: options.maxTokens,
      temperature: options.temperature,
      topP: options.topP,
      seed: options.seed,
      echoPrompt: false,
      ignoreEos: options.ignoreEos,
      onText: options.onText,
      shouldStop: options.shouldStop,
      signal: options.signal,
    })
    return { completionTokens: result.generated - (result.stopReason === 'eos' ? 1 : 0), stopReason: result.stopReason, peers: this.#cluster.size }
  }
}

/** The file or folder name without a model extension: `stories260K` for `/models/stories260K.bin`. */
export function modelIdOf(path: string): string {
  const name = basename(path.replace(/[/\\]+$/, ''))
  return name.replace(/\.(bin|gguf|safetensors)$/i, '') || name
}

function withoutNul(bytes: Uint8Array): Uint8Array {
  return bytes.includes(0) ? bytes.filter((b) => b !== 0) : bytes
}
