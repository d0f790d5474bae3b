import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { childPids, HAVE_MODELS, MODELS_DIR, referenceCases, type Served, startServe } from '../../support/cli.ts'

// `edgeshard serve` as a real process with 3 peers (two local workers) on stories260K, driven by the official
// `openai` npm client. Greedy completions must give llama2.c run.c's reference text exactly.

/** CPU time (user + system) of `pid` and its direct children, in clock ticks (/proc/<pid>/stat fields 14 and 15). */
function cpuTicks(pid: number): number {
  return [pid, ...childPids(pid)].reduce((sum, p) => {
    try {
      const fields = readFileSync(`/proc/${p}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')
      return sum + Number(fields[11]) + Number(fields[12])
    } catch {
      return sum
    }
  }, 0)
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

const cases = referenceCases()
let served: Served | undefined
let client: OpenAI

beforeAll(async () => {
  if (!HAVE_MODELS) return
  // A context of 4096 (the file says 512) leaves room for the long generation the cancellation test interrupts.
  served = await startServe(['--model', join(MODELS_DIR, 'stories260K.bin'), '--peers', '3', '--context', '4096'])
  client = new OpenAI({ baseURL: served.baseURL, apiKey: 'none', maxRetries: 0, timeout: 60_000 })
})
afterAll(async () => {
  await served?.stop()
})

describe.skipIf(!HAVE_MODELS)('edgeshard serve (3 peers, stories260K) with the openai client', () => {
  it('lists the model', async () => {
    const models = await client.models.list()
    expect(models.data.map((m) => m.id)).toEqual(['stories260K'])
  })

  it("greedy completions give run.c's reference text, streaming and not", async () => {
    // Case 0 runs to max_tokens; case 3 ends with BOS (finish_reason 'stop'), non-streaming only to save time.
    for (const index of [0, 3]) {
      const c = cases[index]!
      // run.c printed the prompt, the completion, then a newline.
      const expected = c.stdout.slice(c.prompt.length, -1)
      const maxTokens = c.steps - c.prompt_tokens.length + 1
      const endedByBos = c.next_tokens.at(-1) === 1
      const completionTokens = c.next_tokens.length - c.prompt_tokens.length + 1 - (endedByBos ? 1 : 0)

      const whole = await client.completions.create({ model: 'stories260K', prompt: c.prompt, max_tokens: maxTokens, temperature: 0 })
      expect(whole.choices[0]!.text).toBe(expected)
      expect(whole.choices[0]!.finish_reason).toBe(endedByBos ? 'stop' : 'length')
      expect(whole.usage).toEqual({ prompt_tokens: c.prompt_tokens.length, completion_tokens: completionTokens, total_tokens: c.prompt_tokens.length + completionTokens })
      if (index !== 0) continue

      const stream = await client.completions.create({
        model: 'stories260K',
        prompt: c.prompt,
        max_tokens: maxTokens,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
      })
      let text = ''
      let chunks = 0
      let finish: string | null = null
      let usage: unknown
      for await (const chunk of stream) {
        chunks++
        text += chunk.choices[0]?.text ?? ''
        finish = chunk.choices[0]?.finish_reason ?? finish
        usage = chunk.usage ?? usage
      }
      expect(text).toBe(expected)
      expect(chunks).toBeGreaterThan(completionTokens / 2) // token by token, not one blob
      expect(finish).toBe(endedByBos ? 'stop' : 'length')
      expect(usage).toEqual(whole.usage)
    }
  }, 120_000)

  it('a client that aborts a stream stops its generation: CPU goes idle and the next request is served at once', async () => {
    const pid = served!.child.pid!
    const stream = await client.completions.create({
      model: 'stories260K',
      prompt: 'Once upon a time',
      max_tokens: 4000,
      temperature: 0.8,
      seed: 7,
      stream: true,
      // @ts-expect-error llama.cpp's extension (not in OpenAI's types): keep generating past BOS/EOS
      ignore_eos: true,
    })
    let received = 0
    for await (const _chunk of stream) {
      if (++received === 20) break // leaving the loop aborts the request
    }
    const busyTicks = cpuTicks(pid)
    await sleep(300)
    const before = cpuTicks(pid)
    await sleep(1000)
    const idleTicks = cpuTicks(pid) - before
    // Generating keeps the master and two workers near a full core (≈100 ticks/s); idle they use next to nothing.
    expect(idleTicks, `CPU ticks in 1 s after the abort (were ${busyTicks} at abort)`).toBeLessThan(15)

    const startMs = performance.now()
    const next = await client.completions.create({ model: 'stories260K', prompt: cases[0]!.prompt, max_tokens: 20, temperature: 0 })
    const tookMs = performance.now() - startMs
    expect(cases[0]!.stdout.slice(cases[0]!.prompt.length)).toMatch(new RegExp(`^${escapeRegExp(next.choices[0]!.text)}`))
    // The aborted request had ~3980 tokens left (tens of seconds here); the next one must not wait for them.
    expect(tookMs).toBeLessThan(10_000)
    expect(served!.stderr()).toMatch(/POST \/v1\/completions 499 cancelled/)
  }, 60_000)

  it('20 sequential chat requests on one cluster all succeed', async () => {
    for (let i = 0; i < 20; i++) {
      const request = {
        model: 'stories260K',
        messages: [
          { role: 'system' as const, content: 'You tell short stories.' },
          { role: 'user' as const, content: `Tell me story number ${i}.` },
        ],
        max_tokens: 12,
        temperature: 0.9,
        seed: i + 1,
      }
      let content: string
      if (i % 2 === 0) {
        const r = await client.chat.completions.create(request)
        expect(r.choices[0]!.message.role).toBe('assistant')
        expect(['stop', 'length']).toContain(r.choices[0]!.finish_reason)
        expect(r.usage!.completion_tokens).toBeGreaterThan(0)
        content = r.choices[0]!.message.content ?? ''
      } else {
        content = ''
        for await (const chunk of await client.chat.completions.create({ ...request, stream: true })) content += chunk.choices[0]?.delta.content ?? ''
      }
      expect(content.trim().length, `request ${i}`).toBeGreaterThan(0)
    }
  }, 120_000)

  it('a stop sequence cuts the text and ends generation', async () => {
    const c = cases[0]!
    const r = await client.completions.create({ model: 'stories260K', prompt: c.prompt, max_tokens: 100, temperature: 0, stop: [' Lily', 'zzz'] })
    const expected = c.stdout.slice(c.prompt.length, c.stdout.indexOf(' Lily'))
    expect(r.choices[0]).toMatchObject({ text: expected, finish_reason: 'stop' })
    expect(r.usage!.completion_tokens).toBeLessThan(20) // ", there was a little girl named Lily": generation ended there
  })

  it('bad requests get OpenAI errors through the client', async () => {
    const unknownModel = await client.completions.create({ model: 'gpt-4', prompt: 'x' }).catch((e: unknown) => e)
    expect(unknownModel).toBeInstanceOf(OpenAI.NotFoundError)
    expect(unknownModel).toMatchObject({ status: 404, code: 'model_not_found', param: 'model', type: 'invalid_request_error' })
    const badValue = await client.chat.completions.create({ model: 'stories260K', messages: [{ role: 'user', content: 'x' }], top_p: 5 }).catch((e: unknown) => e)
    expect(badValue).toBeInstanceOf(OpenAI.BadRequestError)
    expect(badValue).toMatchObject({ status: 400, code: 'invalid_value', param: 'top_p' })
    const tooLong = await client.completions.create({ model: 'stories260K', prompt: 'Once upon a time '.repeat(1200) }).catch((e: unknown) => e)
    expect(tooLong).toMatchObject({ status: 400, code: 'context_length_exceeded', param: 'prompt' })
  })
})

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}
