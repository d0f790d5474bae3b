import type { CompletionEngine, EngineGenerateOptions, EngineResult } from '../../../agent/server/index.ts'
import type { ChatMessage } from '../../../agent/tokenizer/chat-template.ts'

/**
 * A stand-in for the cluster behind the OpenAI server: generates the words of `script` one token each, `tokenDelayMs`
 * apart, honouring the signal like `generate`. Records the prompt length of each generation started and finished.
 */
export class ScriptEngine implements CompletionEngine {
  readonly modelId = 'script'
  readonly contextLength = 64
  script = ['Hello', ' world', ',', ' how', ' are', ' you', '?']
  tokenDelayMs = 0
  failWith: Error | null = null
  readonly started: string[] = []
  readonly finished: string[] = []

  encodePrompt(text: string): number[] {
    return [1, ...text.split(' ').filter(Boolean).map(() => 7)]
  }

  encodeChat(messages: readonly ChatMessage[]): number[] {
    if (messages.at(-1)?.role !== 'user') {
      const error = new Error('chat template of script: failed to render: last message must be the user')
      error.name = 'ChatTemplateError'
      throw error
    }
    return this.encodePrompt(messages.map((m) => m.content).join(' '))
  }

  async generate(promptTokens: readonly number[], options: EngineGenerateOptions): Promise<EngineResult> {
    const label = `${promptTokens.length}`
    this.started.push(label)
    if (this.failWith) throw this.failWith
    const encoder = new TextEncoder()
    let produced = 0
    for (const word of this.script) {
      options.signal.throwIfAborted()
      if (this.tokenDelayMs > 0) await new Promise((r) => setTimeout(r, this.tokenDelayMs))
      options.signal.throwIfAborted()
      options.onText(encoder.encode(word))
      produced++
      if (options.shouldStop()) return this.#done(label, produced, 'stopped')
      if (produced >= options.maxTokens) return this.#done(label, produced, 'max-tokens')
    }
    return this.#done(label, produced, 'eos')
  }

  #done(label: string, completionTokens: number, stopReason: EngineResult['stopReason']): EngineResult {
    this.finished.push(label)
    return { completionTokens, stopReason }
  }
}

