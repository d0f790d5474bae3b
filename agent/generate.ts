import type { Cluster } from './cluster.ts'
import { Sampler, type SamplerOptions } from './sampler.ts'

/** What generation needs of a tokenizer (the master's only). */
export interface TextCodec {
  readonly bosId: number
  readonly eosId: number
  /** Token ids of `text` with BOS first. */
  encode(text: string): number[]
  /** Bytes to print for `token` following `prevToken` (run.c `decode` + `safe_printf`; may be empty). */
  printedBytes(prevToken: number, token: number): Uint8Array
}

/** Options of {@link generate}. */
export interface GenerateOptions extends SamplerOptions {
  /** New tokens to generate at most (the prompt not counted). */
  readonly maxTokens: number
  /** Bytes to print, in order: the prompt's pieces first, then each generated token's. */
  readonly onText?: (bytes: Uint8Array) => void
  /** Logits [vocab] f32 used to choose the token at position `pos + 1`, for every position from 0. */
  readonly onLogits?: (pos: number, logits: Float32Array) => void
  /** Pass the prompt's pieces to `onText` before the generated ones (run.c prints them). Default true. */
  readonly echoPrompt?: boolean
  /** Keep generating past BOS/EOS (llama.cpp's `ignore_eos`): only `maxTokens`, the context or `shouldStop` end it. */
  readonly ignoreEos?: boolean
  /** Asked after each generated token's text went to `onText`: true ends generation (e.g. a stop sequence matched). */
  readonly shouldStop?: () => boolean
  /** Ends generation between two forward passes with the signal's reason (an AbortError by default). */
  readonly signal?: AbortSignal
}

/** Why generation ended: BOS/EOS sampled, `maxTokens` reached, the context full, or `shouldStop` said so. */
export type StopReason = 'eos' | 'max-tokens' | 'context' | 'stopped'

/** Outcome and timings of one generation. */
export interface GenerationResult {
  /** The prompt with BOS first. */
  readonly promptTokens: readonly number[]
  /**
   * Token chosen at each position 0..: forced prompt tokens while inside the prompt, then sampled ones; ends with
   * the BOS/EOS that stopped generation, if any (the format of run.c's `next` sequence).
   */
  readonly nextTokens: readonly number[]
  /** Newly generated tokens (sampled ones, including a final BOS/EOS). */
  readonly generated: number
  /** Time to first token: from the call to the first sampled token, in ms. */
  readonly ttftMs: number
  /** Mean decode time per generated token after the first, in ms (0 when only one). */
  readonly msPerToken: number
  /**
   * Where the master's decode time per token went, ms (means over the tokens after the first): its layers in
   * onnxruntime (`computeMs`), the output head in onnxruntime (`headMs`), waiting for allreduces and for weights
   * from disk, and everything else (`otherMs`: embedding lookup, sampling, detokenizing, JS and event-loop time).
   */
  readonly decodeSplit: { readonly computeMs: number; readonly headMs: number; readonly allreduceWaitMs: number; readonly ioWaitMs: number; readonly otherMs: number }
  readonly stopReason: StopReason
}

/**
 * Greedy or sampled generation as llama2.c run.c's `generate`: the prompt is prefilled in one forward pass, then
 * one token per pass until `maxTokens` new tokens, the model's context end, or BOS/EOS (BOS ends a TinyStories
 * story as in run.c; EOS ends real chat models).
 * @param prompt text (encoded with BOS first) or token ids used as they are (e.g. a rendered chat template).
 * @throws whatever the cluster throws (PeerFailedError naming a peer); the signal's reason when `signal` aborts;
 *   RangeError when the prompt is empty or does not fit the context.
 */
export async function generate(
  cluster: Cluster,
  codec: TextCodec,
  prompt: string | readonly number[],
  options: GenerateOptions,
): Promise<GenerationResult> {
  if (!Number.isInteger(options.maxTokens) || options.maxTokens < 1) throw new RangeError(`max tokens must be a whole number ≥ 1, got ${options.maxTokens}`)
  const promptTokens = typeof prompt === 'string' ? codec.encode(prompt) : [...prompt]
  if (promptTokens.length === 0) throw new RangeError('prompt of 0 tokens: at least one token (BOS) is needed')
  const contextLen = cluster.plan.model.maxSeqLen
  if (promptTokens.length >= contextLen) {
    throw new RangeError(`prompt of ${promptTokens.length} tokens does not fit the model's context of ${contextLen}`)
  }
  const sampler = new Sampler(options)
  await cluster.reset()
  const started = performance.now()
  const nextTokens: number[] = []
  const emit = (prev: number, token: number): void => {
    const bytes = codec.printedBytes(prev, token)
    if (bytes.length > 0) options.onText?.(bytes)
  }
  for (let i = 1; i < promptTokens.length; i++) {
    nextTokens.push(promptTokens[i]!)
    if (options.echoPrompt ?? true) emit(promptTokens[i - 1]!, promptTokens[i]!)
  }

  const wantAll = options.onLogits !== undefined
  // With tracing on, one `token` span per generated token: from its forward pass to the sampled id.
  const tracer = cluster.tracer
  let forwardAt = tracer ? performance.now() : 0
  let logits = await cluster.forward(promptTokens, wantAll)
  const vocab = cluster.model.config.vocabSize
  if (wantAll) {
    for (let p = 0; p < promptTokens.length; p++) options.onLogits!(p, logits.subarray(p * vocab, (p + 1) * vocab))
    logits = logits.subarray((promptTokens.length - 1) * vocab)
  }
  let ttftMs = 0
  let firstAt = 0
  let atFirst = { ...cluster.counters.timings, headMs: cluster.counters.headMs }
  let generated = 0
  let prev = promptTokens[promptTokens.length - 1]!
  let stopReason: StopReason
  for (;;) {
    options.signal?.throwIfAborted()
    const token = sampler.sample(logits)
    generated++
    nextTokens.push(token)
    if (tracer) tracer.span('token', 'token', forwardAt, performance.now(), { index: generated - 1, token, pos: cluster.position - 1 })
    if (generated === 1) {
      firstAt = performance.now()
      ttftMs = firstAt - started
      atFirst = { ...cluster.counters.timings, headMs: cluster.counters.headMs }
    }
    if (!options.ignoreEos && (token === codec.bosId || token === codec.eosId)) {
      stopReason = 'eos'
      break
    }
    emit(prev, token)
    prev = token
    if (options.shouldStop?.()) {
      stopReason = 'stopped'
      break
    }
    if (generated >= options.maxTokens) {
      stopReason = 'max-tokens'
      break
    }
    if (cluster.position >= contextLen) {
      stopReason = 'context'
      break
    }
    if (tracer) forwardAt = performance.now()
    logits = await cluster.forward([token])
    options.onLogits?.(cluster.position - 1, logits)
  }
  const msPerToken = generated > 1 ? (performance.now() - firstAt) / (generated - 1) : 0
  const t = cluster.counters.timings
  const per = (ms: number): number => (generated > 1 ? ms / (generated - 1) : 0)
  const computeMs = per(t.computeMs - atFirst.computeMs)
  const headMs = per(cluster.counters.headMs - atFirst.headMs)
  const allreduceWaitMs = per(t.allreduceMs - atFirst.allreduceMs)
  const ioWaitMs = per(t.ioWaitMs - atFirst.ioWaitMs)
  const decodeSplit = { computeMs, headMs, allreduceWaitMs, ioWaitMs, otherMs: Math.max(0, msPerToken - computeMs - headMs - allreduceWaitMs - ioWaitMs) }
  return { promptTokens, nextTokens, generated, ttftMs, msPerToken, decodeSplit, stopReason }
}
