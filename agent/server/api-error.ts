/**
 * Errors the OpenAI-compatible server answers with, in OpenAI's error shape:
 * `{"error": {"message", "type", "param", "code"}}` (OpenAI API reference, "Error codes").
 */

/** OpenAI's error `type`s the server uses. */
export type ApiErrorType = 'invalid_request_error' | 'server_error'

/** An HTTP error answer: status, OpenAI error type and code, and the request parameter at fault. */
export class ApiError extends Error {
  static override name = 'ApiError'
  readonly status: number
  readonly type: ApiErrorType
  readonly param: string | null
  readonly code: string | null

  constructor(status: number, message: string, options: { type?: ApiErrorType; param?: string | null; code?: string | null; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.name = 'ApiError'
    this.status = status
    this.type = options.type ?? (status >= 500 ? 'server_error' : 'invalid_request_error')
    this.param = options.param ?? null
    this.code = options.code ?? null
  }

  /** The JSON body: `{ error: { message, type, param, code } }`. */
  toJSON(): { error: { message: string; type: ApiErrorType; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } }
  }
}

/** 400 for a parameter with a bad value. */
export function invalidParam(param: string, message: string): ApiError {
  return new ApiError(400, message, { param, code: 'invalid_value' })
}
