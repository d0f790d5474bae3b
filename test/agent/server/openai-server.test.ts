import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { GenerationQueue, OpenAiServer, StopText } from '../../../agent/server/index.ts'
import { ScriptEngine } from './script-engine.ts'

// The HTTP front over a stand-in engine: request validation, error shapes, stop sequences, the queue and
// cancellation, without a cluster. (test/agent/server/serve.test.ts runs the real thing.)

/** Response bodies: checked with toEqual/toMatchObject, indexed freely. */
// biome-ignore lint/suspicious/noExplicitAny: a test's view of arbitrary JSON
type Loose = any

const engine = new ScriptEngine()
const server = new OpenAiServer({ engine, port: 0 })
let base = ''
beforeAll(async () => {
  await server.start()
  base = `${server.url}/v1`
})
afterAll(() => server.stop())

async function post(path: string, body: unknown, init: RequestInit = {}): Promise<{ status: number; json: Loose }> {
  const res = await fetch(`${base}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    ...init,
  })
  return { status: res.status, json: await res.json() }
}

function expectError(r: { status: number; json: Loose }, status: number, code: string | null, param: string | null = null): void {
  expect(r.status).toBe(status)
  expect(Object.keys(r.json)).toEqual(['error'])
  expect(r.json.error).toEqual({ message: expect.any(String), type: status >= 500 ? 'server_error' : 'invalid_request_error', param, code })
  expect(r.json.error.message.length).toBeGreaterThan(10)
}

describe('OpenAI-compatible server over a stand-in engine', () => {
  it('answers a completion and a chat with OpenAI shapes and usage', async () => {
    const c = await post('/completions', { model: 'script', prompt: 'a b', max_tokens: 3 })
    expect(c.status).toBe(200)
    expect(c.json).toMatchObject({
      object: 'text_completion',
      model: 'script',
      choices: [{ text: 'Hello world,', index: 0, logprobs: null, finish_reason: 'length' }],
      usage: { prompt_tokens: 3, completion_tokens: 3, total_tokens: 6 },
    })
    const chat = await post('/chat/completions', { model: 'script', messages: [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }] })
    expect(chat.json).toMatchObject({
      object: 'chat.completion',
      choices: [{ index: 0, message: { role: 'assistant', content: 'Hello world, how are you?' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 2, completion_tokens: 7, total_tokens: 9 },
    })
    const models = await (await fetch(`${base}/models`)).json()
    expect(models).toMatchObject({ object: 'list', data: [{ id: 'script', object: 'model', owned_by: 'edgeshard' }] })
  })

  it('cuts the text before a stop sequence, also when it spans tokens, and stops generating', async () => {
    const r = await post('/completions', { model: 'script', prompt: 'x', max_tokens: 50, stop: ['xx', 'd, ho'] })
    expect(r.json.choices[0]).toMatchObject({ text: 'Hello worl', finish_reason: 'stop' })
    expect(r.json.usage.completion_tokens).toBe(4) // ' how' completed the match; nothing after it was generated
    const s = new StopText(['</s>'])
    expect([s.push(Buffer.from('a <')), s.push(Buffer.from('/')), s.push(Buffer.from('b'))]).toEqual(['a ', '', '</b'])
    expect(s.finish()).toBe('')
    const utf8 = new StopText()
    const euro = Buffer.from('€') // 3 bytes over two tokens
    expect([utf8.push(euro.subarray(0, 2)), utf8.push(euro.subarray(2)), utf8.finish()]).toEqual(['', '€', ''])
  })

  it('streams server-sent events ending with [DONE], usage on request', async () => {
    const res = await fetch(`${base}/chat/completions`, {
      method: 'POST',
      body: JSON.stringify({ model: 'script', messages: [{ role: 'user', content: 'hi' }], stream: true, stream_options: { include_usage: true } }),
    })
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/)
    const events = (await res.text()).split('\n\n').filter(Boolean)
    expect(events.at(-1)).toBe('data: [DONE]')
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e.replace(/^data: /, '')))
    expect(chunks[0].choices[0].delta).toEqual({ role: 'assistant', content: '' })
    expect(chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('')).toBe('Hello world, how are you?')
    expect(chunks.at(-2).choices[0]).toMatchObject({ delta: {}, finish_reason: 'stop' })
    expect(chunks.at(-1)).toMatchObject({ choices: [], usage: { prompt_tokens: 2, completion_tokens: 7, total_tokens: 9 } })
  })

  it('answers bad requests in the OpenAI error shape with the right status', async () => {
    expectError(await post('/completions', '{"model": '), 400, 'invalid_json')
    expectError(await post('/completions', { prompt: 'x' }), 400, 'missing_required_parameter', 'model')
    expectError(await post('/completions', { model: 'gpt-4', prompt: 'x' }), 404, 'model_not_found', 'model')
    expectError(await post('/completions', { model: 'script' }), 400, 'missing_required_parameter', 'prompt')
    expectError(await post('/completions', { model: 'script', prompt: 'x', temperature: 3 }), 400, 'invalid_value', 'temperature')
    expectError(await post('/completions', { model: 'script', prompt: 'x', max_tokens: 0 }), 400, 'invalid_value', 'max_tokens')
    expectError(await post('/completions', { model: 'script', prompt: 'x', stop: ['a', 'b', 'c', 'd', 'e'] }), 400, 'invalid_value', 'stop')
    expectError(await post('/completions', { model: 'script', prompt: 'x', n: 2 }), 400, 'invalid_value', 'n')
    expectError(await post('/completions', { model: 'script', prompt: 'w '.repeat(80) }), 400, 'context_length_exceeded', 'prompt')
    expectError(await post('/chat/completions', { model: 'script', messages: [] }), 400, 'invalid_value', 'messages')
    expectError(await post('/chat/completions', { model: 'script', messages: [{ role: 'robot', content: 'x' }] }), 400, 'invalid_value', 'messages[0].role')
    expectError(await post('/chat/completions', { model: 'script', messages: [{ role: 'assistant', content: 'x' }] }), 400, 'invalid_value', 'messages')
    expectError(await post('/completions', JSON.stringify({ model: 'script', prompt: 'x'.repeat(5 * 2 ** 20) })), 413, 'request_too_large')
    expectError(await post('/embeddings', { model: 'script', input: 'x' }), 404, 'unknown_url')
    const get = await fetch(`${base}/completions`)
    expectError({ status: get.status, json: await get.json() }, 405, 'method_not_allowed')
    expectError({ status: (await fetch(`${base}/models/other`)).status, json: await (await fetch(`${base}/models/other`)).json() }, 404, 'model_not_found', 'model')
  })

  it('serves requests one at a time in order; a client that leaves frees the cluster at once', async () => {
    engine.tokenDelayMs = 40
    engine.started.length = 0
    engine.finished.length = 0
    const leaving = new AbortController()
    const first = fetch(`${base}/completions`, {
      method: 'POST',
      body: JSON.stringify({ model: 'script', prompt: 'one', stream: true }),
      signal: leaving.signal,
    })
    await new Promise((r) => setTimeout(r, 20))
    const queuedAndLeaving = new AbortController()
    const second = fetch(`${base}/completions`, { method: 'POST', body: JSON.stringify({ model: 'script', prompt: 'two two' }), signal: queuedAndLeaving.signal })
    await new Promise((r) => setTimeout(r, 20))
    const third = post('/completions', { model: 'script', prompt: 'three three three' })
    const firstResponse = await first
    const reader = firstResponse.body!.getReader()
    await reader.read() // the first token is out
    queuedAndLeaving.abort()
    leaving.abort()
    await expect(second).rejects.toThrow()
    const r3 = await third
    expect(r3.json.choices[0].text).toBe('Hello world, how are you?')
    // The first ran alone and stopped early; the second never started; the third ran after the first.
    expect(engine.started).toEqual(['2', '4'])
    expect(engine.finished).toEqual(['4'])
    engine.tokenDelayMs = 0
  })

  it('keeps the queue in order when a waiting job leaves', async () => {
    const queue = new GenerationQueue()
    const order: string[] = []
    let releaseA: () => void = () => {}
    const a = queue.run(() => new Promise<void>((r) => (releaseA = r)).then(() => void order.push('a')))
    const leave = new AbortController()
    const b = queue.run(async () => void order.push('b'), { signal: leave.signal })
    const c = queue.run(async () => void order.push('c'))
    leave.abort(new Error('gone'))
    await expect(b).rejects.toThrow('gone')
    await new Promise((r) => setTimeout(r, 10))
    expect(order).toEqual([]) // c waits for a, not for b
    releaseA()
    await Promise.all([a, c])
    expect(order).toEqual(['a', 'c'])
  })

  it('answers 503 once the engine failed', async () => {
    engine.failWith = Object.assign(new Error('worker 2 went away during generation'), { name: 'PeerFailedError' })
    expectError(await post('/completions', { model: 'script', prompt: 'x' }), 503, 'cluster_failed')
    engine.failWith = null
    expectError(await post('/completions', { model: 'script', prompt: 'x' }), 503, 'cluster_failed')
    expect((await fetch(`${server.url}/health`)).status).toBe(503)
  })
})
