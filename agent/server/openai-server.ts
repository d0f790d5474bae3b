/**
 * An OpenAI-compatible HTTP server (node:http) in front of one model: `GET /v1/models`, `POST /v1/completions` and
 * `POST /v1/chat/completions` (plus a chat page at `/` and `GET /health`), streaming (server-sent events ending with `data: [DONE]`) or not, with the request
 * and response shapes of the OpenAI API reference. Requests are served one at a time in arrival order; a client that
 * disconnects cancels its generation (or its place in the queue) at once.
 */
import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { logger } from '@libp2p/logger'
import type { ChatMessage } from '../tokenizer/chat-template.ts'
import { ApiError, invalidParam } from './api-error.ts'
import { CHAT_PAGE_CSP, CHAT_PAGE_HTML } from './chat-page.ts'
import type { CompletionEngine, EngineResult } from './engine.ts'
import { GenerationQueue } from './generation-queue.ts'
import { StopText } from './stop-text.ts'

const log = logger('edgeshard:server')

/** Largest request body accepted, bytes (larger: 413). */
export const MAX_BODY_BYTES = 4 * 2 ** 20
/** `max_tokens` of a completion when the request gives none (OpenAI's default for /v1/completions). */
export const DEFAULT_COMPLETION_MAX_TOKENS = 16

/** Options of {@link OpenAiServer}. */
export interface OpenAiServerOptions {
  readonly engine: CompletionEngine
  /** Interface to listen on. Default 127.0.0.1. */
  readonly host?: string
  /** TCP port; 0 picks a free one. Default 8080. */
  readonly port?: number
  /** Serve the built-in chat page at `/`. Default true. */
  readonly chatPage?: boolean
  /** Called once per finished request (for the CLI's access log). */
  readonly onRequestDone?: (summary: RequestSummary) => void
  /** Called once when a generation fails with an error that is not the client's: the server answers 503 from then on. */
  readonly onFailure?: (error: Error) => void
}

/** One line of access log. */
export interface RequestSummary {
  readonly method: string
  readonly path: string
  readonly status: number
  readonly promptTokens?: number
  readonly completionTokens?: number
  /** How the request ended: finish reason, `cancelled` (client left), or the error code. */
  readonly outcome: string
  /** Peers that finished the generation, the master included (when the engine says). */
  readonly peers?: number
  readonly durationMs: number
}

/** What a validated completion or chat request asks for. */
interface GenerationRequest {
  readonly kind: 'completion' | 'chat'
  readonly promptTokens: readonly number[]
  /** Prompt text to prepend to the answer (`echo`), completions only. */
  readonly echo: string
  readonly maxTokens: number
  readonly temperature: number
  readonly topP: number
  readonly seed: number
  readonly stop: readonly string[]
  readonly stream: boolean
  readonly includeUsage: boolean
  readonly ignoreEos: boolean
}

type Json = Record<string, unknown>

/**
 * The server. `start()` listens; `stop()` closes the listener and cancels whatever is queued or running.
 * Status codes: 400 bad request (OpenAI error shape, `param` names the field), 404 unknown model or route,
 * 405 wrong method, 413 body over {@link MAX_BODY_BYTES}, 503 once the cluster has failed.
 * @example
 * const server = new OpenAiServer({ engine: new ClusterEngine(cluster, tokenizer), port: 8080 })
 * await server.start() // then: new OpenAI({ baseURL: server.url + '/v1', apiKey: 'none' })
 */
export class OpenAiServer {
  readonly #options: OpenAiServerOptions
  readonly #engine: CompletionEngine
  readonly #queue = new GenerationQueue()
  readonly #server: Server
  readonly #running = new Set<AbortController>()
  readonly #created = Math.floor(Date.now() / 1000)
  #failure: Error | null = null

  constructor(options: OpenAiServerOptions) {
    this.#options = options
    this.#engine = options.engine
    this.#server = createServer((req, res) => void this.#handle(req, res))
  }

  /** Starts listening. @throws the listen error (e.g. EADDRINUSE). */
  async start(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once('error', reject)
      this.#server.listen(this.#options.port ?? 8080, this.#options.host ?? '127.0.0.1', () => {
        this.#server.off('error', reject)
        resolve()
      })
    })
    log('listening on %s', this.url)
  }

  /** `http://host:port` the server listens on. */
  get url(): string {
    const address = this.#server.address() as AddressInfo
    const host = address.family === 'IPv6' ? `[${address.address}]` : address.address
    return `http://${host}:${address.port}`
  }

  /** The error that made the cluster unusable, if any. */
  get failure(): Error | null {
    return this.#failure
  }

  /** Stops accepting requests, cancels queued and running generations, closes connections. */
  async stop(): Promise<void> {
    for (const c of this.#running) c.abort(new Error('server stopping'))
    await new Promise<void>((resolve) => {
      this.#server.close(() => resolve())
      this.#server.closeAllConnections()
    })
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const startMs = performance.now()
    const path = (req.url ?? '/').split('?')[0]!
    const method = req.method ?? 'GET'
    const done = (status: number, outcome: string, usage: { promptTokens?: number; completionTokens?: number; peers?: number } = {}): void => {
      this.#options.onRequestDone?.({ method, path, status, outcome, durationMs: performance.now() - startMs, ...usage })
    }
    try {
      if ((path === '/' || path === '/index.html') && this.#options.chatPage !== false) {
        allow(method, 'GET')
        res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Security-Policy': CHAT_PAGE_CSP, 'Cache-Control': 'no-cache' })
        res.end(CHAT_PAGE_HTML)
        return done(200, 'ok')
      }
      if (path === '/v1/models' || path === '/models') {
        allow(method, 'GET')
        sendJson(res, 200, { object: 'list', data: [this.#modelObject()] })
        return done(200, 'ok')
      }
      const modelPath = /^\/(?:v1\/)?models\/(.+)$/.exec(path)
      if (modelPath) {
        allow(method, 'GET')
        const id = decodeURIComponent(modelPath[1]!)
        if (id !== this.#engine.modelId) throw unknownModel(id, this.#engine.modelId)
        sendJson(res, 200, this.#modelObject())
        return done(200, 'ok')
      }
      if (path === '/health') {
        allow(method, 'GET')
        const failed = this.#failure !== null
        sendJson(res, failed ? 503 : 200, { status: failed ? 'failed' : 'ok', model: this.#engine.modelId, queued: this.#queue.length })
        return done(failed ? 503 : 200, failed ? 'cluster_failed' : 'ok')
      }
      const kind = path === '/v1/completions' || path === '/completions' ? 'completion' : path === '/v1/chat/completions' || path === '/chat/completions' ? 'chat' : null
      if (kind === null) throw new ApiError(404, `Invalid URL (${method} ${path})`, { code: 'unknown_url' })
      allow(method, 'POST')
      this.#throwIfFailed()
      const body = await readJson(req)
      const request = kind === 'completion' ? this.#parseCompletion(body) : this.#parseChat(body)
      await this.#generate(request, req, res, done)
    } catch (err) {
      const error = err instanceof ApiError ? err : new ApiError(500, `internal error: ${(err as Error).message}`, { code: 'internal_error' })
      if (!(err instanceof ApiError)) log.error('%s %s failed: %s', method, path, (err as Error).stack)
      if (!res.headersSent) sendJson(res, error.status, error.toJSON())
      else res.end()
      done(error.status, error.code ?? error.type)
    }
  }

  #modelObject(): Json {
    return { id: this.#engine.modelId, object: 'model', created: this.#created, owned_by: 'edgeshard' }
  }

  #throwIfFailed(): void {
    if (this.#failure) {
      throw new ApiError(503, `the cluster has failed and cannot serve requests: ${this.#failure.message}`, { code: 'cluster_failed' })
    }
  }

  /** Queues the generation, then answers with JSON or an event stream. */
  async #generate(
    request: GenerationRequest,
    req: IncomingMessage,
    res: ServerResponse,
    done: (status: number, outcome: string, usage?: { promptTokens?: number; completionTokens?: number; peers?: number }) => void,
  ): Promise<void> {
    const controller = new AbortController()
    const onClose = (): void => {
      if (!res.writableFinished) controller.abort(new Error('client disconnected'))
    }
    res.on('close', onClose)
    req.socket.setNoDelay(true)
    this.#running.add(controller)
    const id = `${request.kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replaceAll('-', '')}`
    const created = Math.floor(Date.now() / 1000)
    const stopText = new StopText(request.stop)
    const promptTokens = request.promptTokens.length
    let streamed = false
    let text = request.echo
    const chunk = (piece: string, finishReason: string | null, usage?: Json): Json =>
      request.kind === 'chat'
        ? {
            id,
            object: 'chat.completion.chunk',
            created,
            model: this.#engine.modelId,
            choices:
              usage !== undefined
                ? []
                : [{ index: 0, delta: finishReason === null ? { content: piece } : {}, logprobs: null, finish_reason: finishReason }],
            ...(usage !== undefined ? { usage } : request.includeUsage ? { usage: null } : {}),
          }
        : {
            id,
            object: 'text_completion',
            created,
            model: this.#engine.modelId,
            choices: usage !== undefined ? [] : [{ text: piece, index: 0, logprobs: null, finish_reason: finishReason }],
            ...(usage !== undefined ? { usage } : request.includeUsage ? { usage: null } : {}),
          }
    const emit = (piece: string): void => {
      if (piece.length === 0) return
      if (request.stream) res.write(`data: ${JSON.stringify(chunk(piece, null))}\n\n`)
      else text += piece
    }
    try {
      const result = await this.#queue.run(
        async (): Promise<EngineResult> => {
          this.#throwIfFailed()
          if (request.stream) {
            res.writeHead(200, { 'Content-Type': 'text/event-stream; charset=utf-8', 'Cache-Control': 'no-cache', Connection: 'keep-alive' })
            streamed = true
            if (request.kind === 'chat') {
              const first = { ...chunk('', null), choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }] }
              res.write(`data: ${JSON.stringify(first)}\n\n`)
            }
            if (request.echo.length > 0) emit(request.echo)
          }
          try {
            return await this.#engine.generate(request.promptTokens, {
              maxTokens: request.maxTokens,
              temperature: request.temperature,
              topP: request.topP,
              seed: request.seed,
              ignoreEos: request.ignoreEos,
              onText: (bytes) => emit(stopText.push(bytes)),
              shouldStop: () => stopText.stopped,
              signal: controller.signal,
            })
          } catch (err) {
            if (controller.signal.aborted) throw err
            // Not the client's doing: the cluster is in an unknown state (a peer went away, a runtime error).
            this.#failure = err as Error
            log.error('generation failed: %s', (err as Error).message)
            this.#options.onFailure?.(err as Error)
            throw new ApiError(503, `generation failed: ${(err as Error).message}`, { code: 'cluster_failed', cause: err })
          }
        },
        { signal: controller.signal },
      )
      emit(stopText.finish())
      const finishReason = stopText.stopped || result.stopReason === 'eos' || result.stopReason === 'stopped' ? 'stop' : 'length'
      const usage = { prompt_tokens: promptTokens, completion_tokens: result.completionTokens, total_tokens: promptTokens + result.completionTokens }
      if (request.stream) {
        res.write(`data: ${JSON.stringify(chunk('', finishReason))}\n\n`)
        if (request.includeUsage) res.write(`data: ${JSON.stringify(chunk('', null, usage))}\n\n`)
        res.end('data: [DONE]\n\n')
      } else {
        const choice =
          request.kind === 'chat'
            ? { index: 0, message: { role: 'assistant', content: text, refusal: null }, logprobs: null, finish_reason: finishReason }
            : { text, index: 0, logprobs: null, finish_reason: finishReason }
        sendJson(res, 200, {
          id,
          object: request.kind === 'chat' ? 'chat.completion' : 'text_completion',
          created,
          model: this.#engine.modelId,
          choices: [choice],
          usage,
        })
      }
      done(200, finishReason, { promptTokens, completionTokens: result.completionTokens, ...(result.peers === undefined ? {} : { peers: result.peers }) })
    } catch (err) {
      if (controller.signal.aborted) {
        log('request %s cancelled: %s', id, (controller.signal.reason as Error)?.message)
        if (!res.writableEnded) res.destroy()
        done(499, 'cancelled', { promptTokens })
        return
      }
      if (streamed && err instanceof ApiError) {
        // Headers are gone: report the error as a last event, as OpenAI does mid-stream.
        res.write(`data: ${JSON.stringify(err.toJSON())}\n\n`)
        res.end()
        done(err.status, err.code ?? err.type, { promptTokens })
        return
      }
      throw err
    } finally {
      this.#running.delete(controller)
      res.off('close', onClose)
    }
  }

  #parseCompletion(body: Json): GenerationRequest {
    this.#checkModel(body)
    let prompt = body.prompt
    if (Array.isArray(prompt) && prompt.length === 1 && typeof prompt[0] === 'string') prompt = prompt[0]
    if (prompt === undefined) throw new ApiError(400, 'you must provide a prompt', { param: 'prompt', code: 'missing_required_parameter' })
    if (typeof prompt !== 'string') throw invalidParam('prompt', 'prompt must be a string (or an array holding one string)')
    const echo = optionalBoolean(body, 'echo') ?? false
    const promptTokens = this.#engine.encodePrompt(prompt)
    return this.#common(body, 'completion', promptTokens, echo ? prompt : '', 'prompt', DEFAULT_COMPLETION_MAX_TOKENS)
  }

  #parseChat(body: Json): GenerationRequest {
    this.#checkModel(body)
    const messages = body.messages
    if (messages === undefined) throw new ApiError(400, 'you must provide messages', { param: 'messages', code: 'missing_required_parameter' })
    if (!Array.isArray(messages) || messages.length === 0) throw invalidParam('messages', 'messages must be a non-empty array')
    const parsed: ChatMessage[] = messages.map((m: unknown, i) => parseMessage(m, i))
    let promptTokens: number[]
    try {
      promptTokens = this.#engine.encodeChat(parsed)
    } catch (err) {
      if ((err as Error).name === 'ChatTemplateError') throw invalidParam('messages', (err as Error).message)
      throw err
    }
    return this.#common(body, 'chat', promptTokens, '', 'messages', undefined)
  }

  #checkModel(body: Json): void {
    const model = body.model
    if (model === undefined) throw new ApiError(400, 'you must provide a model parameter', { param: 'model', code: 'missing_required_parameter' })
    if (typeof model !== 'string') throw invalidParam('model', 'model must be a string')
    if (model !== this.#engine.modelId) throw unknownModel(model, this.#engine.modelId)
  }

  /** The parameters completions and chat share. */
  #common(
    body: Json,
    kind: 'completion' | 'chat',
    promptTokens: readonly number[],
    echo: string,
    promptParam: string,
    defaultMaxTokens: number | undefined,
  ): GenerationRequest {
    const context = this.#engine.contextLength
    if (promptTokens.length >= context) {
      throw new ApiError(
        400,
        `This model's maximum context length is ${context} tokens. However, your ${kind === 'chat' ? 'messages' : 'prompt'} resulted in ${promptTokens.length} tokens, leaving no room for the completion.`,
        { param: promptParam, code: 'context_length_exceeded' },
      )
    }
    const n = optionalNumber(body, 'n')
    if (n !== undefined && n !== 1) throw invalidParam('n', 'only n = 1 is supported')
    for (const key of ['logprobs', 'top_logprobs', 'best_of', 'suffix', 'tools', 'functions'] as const) {
      const v = body[key]
      const harmless = v === undefined || v === null || v === false || (key === 'best_of' && v === 1) || (Array.isArray(v) && v.length === 0)
      if (!harmless) throw invalidParam(key, `${key} is not supported by this server`)
    }
    const maxKey = body.max_completion_tokens !== undefined && body.max_completion_tokens !== null ? 'max_completion_tokens' : 'max_tokens'
    const maxTokens = optionalInteger(body, maxKey, 1) ?? defaultMaxTokens ?? context - promptTokens.length
    const temperature = optionalNumber(body, 'temperature') ?? 1
    if (temperature < 0 || temperature > 2) throw invalidParam('temperature', `temperature must be between 0 and 2, got ${temperature}`)
    const topP = optionalNumber(body, 'top_p') ?? 1
    if (topP <= 0 || topP > 1) throw invalidParam('top_p', `top_p must be in (0, 1], got ${topP}`)
    const seed = optionalInteger(body, 'seed', Number.MIN_SAFE_INTEGER) ?? Math.floor(Math.random() * 2 ** 52) + 1
    const stream = optionalBoolean(body, 'stream') ?? false
    const streamOptions = body.stream_options
    if (streamOptions !== undefined && streamOptions !== null && (typeof streamOptions !== 'object' || Array.isArray(streamOptions))) {
      throw invalidParam('stream_options', 'stream_options must be an object')
    }
    const includeUsage = stream && (streamOptions as Json | null | undefined)?.include_usage === true
    return {
      kind,
      promptTokens,
      echo,
      maxTokens,
      temperature,
      topP,
      seed,
      stop: parseStop(body.stop),
      stream,
      includeUsage,
      ignoreEos: optionalBoolean(body, 'ignore_eos') ?? false,
    }
  }
}

function unknownModel(id: string, served: string): ApiError {
  return new ApiError(404, `The model '${id}' does not exist: this server serves '${served}'`, { param: 'model', code: 'model_not_found' })
}

function allow(method: string, allowed: string): void {
  if (method !== allowed) throw new ApiError(405, `method ${method} is not allowed here: use ${allowed}`, { code: 'method_not_allowed' })
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) })
  res.end(text)
}

/** The request body as a JSON object. @throws ApiError 413 when too large, 400 when not a JSON object. */
async function readJson(req: IncomingMessage): Promise<Json> {
  const declared = Number(req.headers['content-length'] ?? 0)
  if (declared > MAX_BODY_BYTES) throw new ApiError(413, `request body of ${declared} bytes exceeds the limit of ${MAX_BODY_BYTES}`, { code: 'request_too_large' })
  const parts: Buffer[] = []
  let size = 0
  for await (const part of req) {
    size += (part as Buffer).length
    if (size > MAX_BODY_BYTES) throw new ApiError(413, `request body exceeds the limit of ${MAX_BODY_BYTES} bytes`, { code: 'request_too_large' })
    parts.push(part as Buffer)
  }
  let body: unknown
  try {
    body = JSON.parse(Buffer.concat(parts).toString('utf8'))
  } catch (err) {
    throw new ApiError(400, `could not parse the JSON body of the request: ${(err as Error).message}`, { code: 'invalid_json' })
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError(400, 'the request body must be a JSON object', { code: 'invalid_json' })
  return body as Json
}

function parseMessage(value: unknown, index: number): ChatMessage {
  const param = `messages[${index}]`
  if (typeof value !== 'object' || value === null) throw invalidParam(param, `${param} must be an object with role and content`)
  const m = value as Json
  if (typeof m.role !== 'string' || !['system', 'developer', 'user', 'assistant', 'tool'].includes(m.role)) {
    throw invalidParam(`${param}.role`, `${param}.role must be one of system, developer, user, assistant, tool`)
  }
  let content = m.content
  if (content === null || content === undefined) content = ''
  if (Array.isArray(content)) {
    content = content
      .map((part: unknown, j) => {
        const p = part as Json | null
        if (p?.type !== 'text' || typeof p.text !== 'string') throw invalidParam(`${param}.content[${j}]`, 'only text content parts are supported')
        return p.text
      })
      .join('')
  }
  if (typeof content !== 'string') throw invalidParam(`${param}.content`, `${param}.content must be a string or an array of text parts`)
  return { role: m.role, content }
}

function parseStop(value: unknown): string[] {
  if (value === undefined || value === null) return []
  const stops = typeof value === 'string' ? [value] : value
  if (!Array.isArray(stops) || stops.length > 4 || !stops.every((s) => typeof s === 'string' && s.length > 0)) {
    throw invalidParam('stop', 'stop must be a non-empty string or an array of at most 4 non-empty strings')
  }
  return stops as string[]
}

function optionalNumber(body: Json, key: string): number | undefined {
  const v = body[key]
  if (v === undefined || v === null) return undefined
  if (typeof v !== 'number' || !Number.isFinite(v)) throw invalidParam(key, `${key} must be a number, got ${JSON.stringify(v)}`)
  return v
}

function optionalInteger(body: Json, key: string, min: number): number | undefined {
  const v = optionalNumber(body, key)
  if (v === undefined) return undefined
  if (!Number.isSafeInteger(v) || v < min) throw invalidParam(key, `${key} must be a whole number ≥ ${min}, got ${v}`)
  return v
}

function optionalBoolean(body: Json, key: string): boolean | undefined {
  const v = body[key]
  if (v === undefined || v === null) return undefined
  if (typeof v !== 'boolean') throw invalidParam(key, `${key} must be true or false, got ${JSON.stringify(v)}`)
  return v
}
