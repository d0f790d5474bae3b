/**
 * Messages of the split-computing protocol (`/edgeshard/split/1.0.0`), one frame each (msgpack header + raw body, see
 * transport/frame.ts). The head peer (device) dials the tail peer (server) and drives; the server only answers.
 *
 * | head → tail                                   | tail → head                                          |
 * |-----------------------------------------------|------------------------------------------------------|
 * | `hello` {model sha256, link?}                 | `hello` {model, nodes}                               |
 * | `cut` {id, crossing, observed, batch}         | `cut` {id, tailNodes, loadMs}                        |
 * | `infer` {id, cut} body: bottleneck payload    | `result` {id, decodeMs, tailMs} body: outputs (f32)  |
 * | `ping` {id}                                   | `pong` {id}                                          |
 * | `probe` {id} body: filler bytes               | `probe` {id}                                         |
 * | `profile` {id, cuts, repeats} body: inputs    | `profile` {id, tailMs[], fullMs}                     |
 * | `bye`                                         | `error` {id?, message, name} on any failure          |
 *
 * Payloads are `transport/bottleneck-codec.ts` payloads: crossing tensors in crossing order, inputs and outputs in
 * the model's declaration order. `link` asks the server to shape its replies like the head shapes its requests.
 */
import type { Frame } from '../../transport/index.ts'
import { SplitProtocolError } from '../errors.ts'

/** A crossing tensor's observed type and shape, so the server can type tail inputs the model leaves untyped. */
export interface ObservedSpec {
  readonly name: string
  readonly type: string
  readonly dims: readonly number[]
}

export type HeadMessage =
  | { type: 'hello'; model: string; link?: { rttMs: number; bitsPerSecond: number } }
  | { type: 'cut'; id: number; crossing: string[]; observed: ObservedSpec[]; batch: number }
  | { type: 'infer'; id: number; cut: number }
  | { type: 'ping'; id: number }
  | { type: 'probe'; id: number }
  | { type: 'profile'; id: number; cuts: { index: number; crossing: string[] }[]; observed: ObservedSpec[]; batch: number; repeats: number }
  | { type: 'bye' }

export type TailMessage =
  | { type: 'hello'; model: string; nodes: number }
  | { type: 'cut'; id: number; tailNodes: number; loadMs: number }
  | { type: 'result'; id: number; decodeMs: number; tailMs: number }
  | { type: 'pong'; id: number }
  | { type: 'probe'; id: number }
  | { type: 'profile'; id: number; tailMs: number[]; fullMs: number }
  | { type: 'error'; id?: number; message: string; name: string }

function fail(type: unknown, detail: string): never {
  throw new SplitProtocolError(`split frame ${JSON.stringify(type)}: ${detail}`)
}

function num(h: Record<string, unknown>, key: string, min = 0): number {
  const v = h[key]
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min) fail(h.type, `field ${key} must be a number ≥ ${min}, got ${JSON.stringify(v)}`)
  return v
}

function int(h: Record<string, unknown>, key: string, min = 0): number {
  const v = num(h, key, min)
  if (!Number.isInteger(v)) fail(h.type, `field ${key} must be an integer, got ${v}`)
  return v
}

function str(h: Record<string, unknown>, key: string): string {
  const v = h[key]
  if (typeof v !== 'string') fail(h.type, `field ${key} must be a string`)
  return v
}

function names(h: Record<string, unknown>, key: string, value: unknown = h[key]): string[] {
  if (!Array.isArray(value) || value.length === 0 || !value.every((n) => typeof n === 'string')) fail(h.type, `field ${key} must be a non-empty list of tensor names`)
  return value as string[]
}

function observed(h: Record<string, unknown>): ObservedSpec[] {
  const v = h.observed
  if (!Array.isArray(v)) fail(h.type, 'field observed must be a list')
  return v.map((o: unknown) => {
    const r = o as Record<string, unknown>
    if (typeof r?.name !== 'string' || typeof r.type !== 'string' || !Array.isArray(r.dims) || !r.dims.every((d) => Number.isInteger(d) && d >= 0)) {
      fail(h.type, 'observed entries must be {name, type, dims}')
    }
    return { name: r.name, type: r.type, dims: r.dims as number[] }
  })
}

/**
 * Checks a frame a tail server received.
 * @throws SplitProtocolError naming the frame type and field
 */
export function parseHeadMessage(frame: Frame): HeadMessage {
  const h = frame.header as Record<string, unknown>
  switch (h.type) {
    case 'hello': {
      const link = h.link as { rttMs?: unknown; bitsPerSecond?: unknown } | undefined
      if (link !== undefined && link !== null) {
        if (typeof link.rttMs !== 'number' || typeof link.bitsPerSecond !== 'number' || !(link.bitsPerSecond > 0) || !(link.rttMs >= 0)) {
          fail(h.type, 'field link must be {rttMs ≥ 0, bitsPerSecond > 0}')
        }
        return { type: 'hello', model: str(h, 'model'), link: { rttMs: link.rttMs, bitsPerSecond: link.bitsPerSecond } }
      }
      return { type: 'hello', model: str(h, 'model') }
    }
    case 'cut':
      return { type: 'cut', id: int(h, 'id'), crossing: names(h, 'crossing'), observed: observed(h), batch: int(h, 'batch', 1) }
    case 'infer':
      return { type: 'infer', id: int(h, 'id'), cut: int(h, 'cut') }
    case 'ping':
      return { type: 'ping', id: int(h, 'id') }
    case 'probe':
      return { type: 'probe', id: int(h, 'id') }
    case 'profile': {
      if (!Array.isArray(h.cuts)) fail(h.type, 'field cuts must be a list')
      const cuts = (h.cuts as Record<string, unknown>[]).map((c) => ({ index: int(c, 'index'), crossing: names(h, 'cuts[].crossing', c?.crossing) }))
      return { type: 'profile', id: int(h, 'id'), cuts, observed: observed(h), batch: int(h, 'batch', 1), repeats: int(h, 'repeats', 1) }
    }
    case 'bye':
      return { type: 'bye' }
    default:
      return fail(h.type, 'unexpected frame type from the head peer')
  }
}

/**
 * Checks a frame a head client received.
 * @throws SplitProtocolError naming the frame type and field
 */
export function parseTailMessage(frame: Frame): TailMessage {
  const h = frame.header as Record<string, unknown>
  switch (h.type) {
    case 'hello':
      return { type: 'hello', model: str(h, 'model'), nodes: int(h, 'nodes') }
    case 'cut':
      return { type: 'cut', id: int(h, 'id'), tailNodes: int(h, 'tailNodes'), loadMs: num(h, 'loadMs') }
    case 'result':
      return { type: 'result', id: int(h, 'id'), decodeMs: num(h, 'decodeMs'), tailMs: num(h, 'tailMs') }
    case 'pong':
      return { type: 'pong', id: int(h, 'id') }
    case 'probe':
      return { type: 'probe', id: int(h, 'id') }
    case 'profile': {
      const tailMs = h.tailMs
      if (!Array.isArray(tailMs) || !tailMs.every((t) => typeof t === 'number')) fail(h.type, 'field tailMs must be a list of numbers')
      return { type: 'profile', id: int(h, 'id'), tailMs: tailMs as number[], fullMs: num(h, 'fullMs') }
    }
    case 'error':
      return {
        type: 'error',
        ...(typeof h.id === 'number' ? { id: h.id } : {}),
        message: typeof h.message === 'string' ? h.message : 'unknown error',
        name: typeof h.name === 'string' ? h.name : 'Error',
      }
    default:
      return fail(h.type, 'unexpected frame type from the tail peer')
  }
}
