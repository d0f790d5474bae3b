import { describe, expect, it } from 'vitest'
import { renderChat } from '../../../agent/tokenizer/chat-template.ts'
import { HfTokenizer } from '../../../agent/tokenizer/hf-tokenizer.ts'
import { ggufBpeTokenizerJson } from '../../../splitter/formats/gguf-bpe-tokenizer.ts'
import type { GgufValue } from '../../../splitter/formats/gguf.ts'
import { byteLevelVocab } from '../../splitter/formats/byte-level-fixture.ts'

/** Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template. */
const LLAMA3 =
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + " +
  "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}" +
  "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

/** Qwen2-Instruct's ChatML template (default system message). */
const CHATML =
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful " +
  "assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

const messages = [
  { role: 'system', content: 'Be brief. ' },
  { role: 'user', content: 'Héllo?' },
]

describe('renderChat', () => {
  it('renders a Llama 3 template with its BOS, trimmed contents and the assistant header', () => {
    expect(renderChat(LLAMA3, messages, { bosToken: '<|begin_of_text|>', eosToken: '<|eot_id|>' })).toBe(
      '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>' +
        '<|start_header_id|>user<|end_header_id|>\n\nHéllo?<|eot_id|>' +
        '<|start_header_id|>assistant<|end_header_id|>\n\n',
    )
    expect(renderChat(LLAMA3, messages.slice(1), { bosToken: '<|begin_of_text|>', addGenerationPrompt: false })).toBe(
      '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHéllo?<|eot_id|>',
    )
  })

  it('renders ChatML (Qwen2), adding the default system turn when there is none', () => {
    expect(renderChat(CHATML, messages)).toBe(
      '<|im_start|>system\nBe brief. <|im_end|>\n<|im_start|>user\nHéllo?<|im_end|>\n<|im_start|>assistant\n',
    )
    expect(renderChat(CHATML, [{ role: 'user', content: 'hi' }], { addGenerationPrompt: false })).toBe(
      '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n',
    )
  })

  it('the rendered ChatML encodes with its control tokens as single ids and no extra BOS', () => {
    const { tokens, merges, types } = byteLevelVocab()
    const meta = new Map<string, GgufValue>([
      ['tokenizer.ggml.merges', merges],
      ['tokenizer.ggml.token_type', Int32Array.from(types)],
      ['tokenizer.ggml.pre', 'qwen2'],
      ['tokenizer.ggml.add_bos_token', true],
    ])
    const tok = new HfTokenizer(ggufBpeTokenizerJson('t.gguf', meta, tokens, tokens.indexOf('<|endoftext|>')))
    const ids = tok.encode(renderChat(CHATML, [{ role: 'user', content: 'hi' }]), { bos: false })
    const start = tokens.indexOf('<|im_start|>')
    const end = tokens.indexOf('<|im_end|>')
    expect(ids[0]).toBe(start)
    expect(ids.filter((t) => t === start)).toHaveLength(3)
    expect(ids.filter((t) => t === end)).toHaveLength(2)
    expect(ids).not.toContain(tok.bosId)
  })

  it('reports templates that do not parse or that raise, as one-line ChatTemplateErrors', () => {
    const raising = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    expect(renderChat(raising, [{ role: 'user', content: 'x' }])).toBe('ok')
    const errorOf = (fn: () => unknown): Error => {
      try {
        fn()
      } catch (e) {
        return e as Error
      }
      throw new Error('expected an error')
    }
    const raised = errorOf(() => renderChat(raising, [{ role: 'assistant', content: 'x' }], { source: '/m/qwen.gguf' }))
    expect(raised.name).toBe('ChatTemplateError')
    expect(raised.message).toBe('chat template of /m/qwen.gguf: failed to render: Conversation must start with user')
    const broken = errorOf(() => renderChat('{% for m in messages %}', messages))
    expect(broken.name).toBe('ChatTemplateError')
    expect(broken.message).toMatch(/^chat template of the model: (does not parse|failed to render)/)
    expect(broken.message).not.toMatch(/\n/)
  })
})
