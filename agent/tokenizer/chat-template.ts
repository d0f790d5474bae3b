/**
 * Chat templates (Jinja, as in transformers `apply_chat_template`) rendered with @huggingface/jinja.
 */
import { Template } from '@huggingface/jinja'
import { ChatTemplateError } from '../../splitter/index.ts'

/** One chat message (OpenAI / transformers shape). */
export interface ChatMessage {
  readonly role: string
  readonly content: string
}

/** Options of `renderChat`. */
export interface RenderChatOptions {
  /** Text of the BOS token (`bos_token` in the template), e.g. '<|begin_of_text|>'. Default ''. */
  readonly bosToken?: string
  /** Text of the EOS token (`eos_token`). Default ''. */
  readonly eosToken?: string
  /** End with the opening of an assistant turn (`add_generation_prompt`). Default true. */
  readonly addGenerationPrompt?: boolean
  /** More template variables (e.g. `tools`, `date_string`). */
  readonly variables?: Readonly<Record<string, unknown>>
  /** Where the template came from, for error messages. Default 'the model'. */
  readonly source?: string
}

/**
 * Renders `messages` with the Jinja chat `template` the way transformers' `apply_chat_template` does: variables
 * `messages`, `bos_token`, `eos_token`, `add_generation_prompt` (@huggingface/jinja supplies `raise_exception(msg)`). The result is text to
 * encode WITHOUT adding another BOS (the template writes its own `bos_token`).
 * Errors: ChatTemplateError naming `source` when the template does not parse or fails while rendering (e.g. it
 * raised 'Conversation roles must alternate user/assistant').
 * Source: transformers `PreTrainedTokenizerBase.apply_chat_template`; @huggingface/jinja `Template`.
 * @example
 * renderChat(model.chatTemplate!, [{ role: 'user', content: 'Hi' }], { bosToken: '<|begin_of_text|>' })
 */
export function renderChat(template: string, messages: readonly ChatMessage[], options: RenderChatOptions = {}): string {
  const source = options.source ?? 'the model'
  let parsed: Template
  try {
    parsed = new Template(template)
  } catch (err) {
    throw new ChatTemplateError(source, `does not parse: ${(err as Error).message}`, { cause: err })
  }
  try {
    return parsed.render({
      ...options.variables,
      messages: messages.map((m) => ({ ...m })),
      bos_token: options.bosToken ?? '',
      eos_token: options.eosToken ?? '',
      add_generation_prompt: options.addGenerationPrompt ?? true,
    })
  } catch (err) {
    throw new ChatTemplateError(source, `failed to render: ${(err as Error).message}`, { cause: err })
  }
}
