/**
 * `edgeshard report FILE.json --svg OUT.svg`: draws a trace written by `run/serve --trace` (Chrome trace events, see
 * ../trace.ts) as a standalone SVG: one lane per peer with its spans on a shared time axis (coloured by category),
 * and a per-token breakdown of the master's time (stacked bars: compute, allreduce wait, I/O wait, other).
 *
 * Elements carry data attributes for tools and tests: `[data-lane]` (one per peer, value = pid, with `data-peer` and
 * `data-role`), `[data-span]` (value = category), `[data-token-bar]` (value = token index).
 */
import { readFileSync, writeFileSync } from 'node:fs'
import type { Command } from 'commander'
import { UsageError } from '../errors.ts'
import type { TraceEvent } from '../trace.ts'

/** Colours of span categories and breakdown parts (Tableau 10). */
const COLOURS: Record<string, string> = {
  compute: '#4e79a7',
  allreduce: '#f28e2b',
  io: '#e15759',
  net: '#76b7b2',
  forward: '#bab0ac',
  token: '#59a14f',
  other: '#d4cfcb',
}
const LABELS: Record<string, string> = {
  compute: 'compute (attention / FFN)',
  allreduce: 'allreduce wait',
  io: 'I/O wait (weights from disk)',
  net: 'network send / receive',
  forward: 'forward pass',
  token: 'token',
  other: 'other (sampling, head, send)',
}

const WIDTH = 1200
const LEFT = 250 // lane labels
const RIGHT = 30
const ROW = 18 // height of one row of spans, px

interface Peer {
  readonly pid: number
  readonly name: string
  readonly role: string
  readonly peer: string
  readonly spans: TraceEvent[]
}

/** Per-token milliseconds of the master, in token order. */
export interface TokenBreakdown {
  readonly index: number
  readonly computeMs: number
  readonly allreduceMs: number
  readonly ioMs: number
  readonly otherMs: number
}

/**
 * Renders a trace as SVG text.
 * @throws UsageError when the JSON is not a trace of edgeshard (no `traceEvents` array, no spans).
 */
export function renderTraceSvg(trace: unknown): string {
  const events = (trace as { traceEvents?: unknown })?.traceEvents
  if (!Array.isArray(events)) throw new UsageError('not a Chrome trace: no traceEvents array')
  const peers = peersOf(events as TraceEvent[])
  if (peers.length === 0) throw new UsageError('the trace holds no spans (ph "X")')

  // Time range: the forward passes and tokens (shard loading before them is left out).
  let t0 = Number.POSITIVE_INFINITY
  let t1 = Number.NEGATIVE_INFINITY
  for (const p of peers) {
    for (const e of p.spans) {
      if (e.cat === 'net') continue
      t0 = Math.min(t0, e.ts)
      t1 = Math.max(t1, e.ts + (e.dur ?? 0))
    }
  }
  if (!Number.isFinite(t0)) {
    t0 = Math.min(...peers.flatMap((p) => p.spans.map((e) => e.ts)))
    t1 = Math.max(...peers.flatMap((p) => p.spans.map((e) => e.ts + (e.dur ?? 0))))
  }
  const spanUs = Math.max(1, t1 - t0)
  const plotW = WIDTH - LEFT - RIGHT
  const x = (ts: number): number => LEFT + ((ts - t0) / spanUs) * plotW

  const out: string[] = []
  let y = 0
  const master = peers.find((p) => p.role === 'master') ?? peers[0]!
  const tokens = master.spans.filter((e) => e.cat === 'token').sort((a, b) => a.ts - b.ts)
  y += 28
  out.push(
    text(LEFT - 230, y, `edgeshard trace: ${peers.length} peer${peers.length === 1 ? '' : 's'}, ${tokens.length} tokens, ${fmtMs(spanUs / 1000)} ms`, {
      'font-size': 18,
      'font-weight': 'bold',
    }),
  )
  y += 14
  y = legend(out, y, ['compute', 'allreduce', 'io', 'net', 'forward', 'token'])

  // Timeline: one lane per peer.
  y += 16
  y += 14
  out.push(text(LEFT - 230, y, 'Timeline per peer', { 'font-size': 15, 'font-weight': 'bold' }))
  y += 8
  const timelineTop = y
  for (const [i, p] of peers.entries()) {
    const rows: { label: string; spans: TraceEvent[] }[] = [
      { label: 'forward', spans: p.spans.filter((e) => e.cat === 'forward') },
      { label: 'compute / wait', spans: p.spans.filter((e) => e.cat === 'compute' || e.cat === 'allreduce' || e.cat === 'io') },
      { label: 'network', spans: p.spans.filter((e) => e.cat === 'net') },
    ]
    const tokenSpans = p.spans.filter((e) => e.cat === 'token')
    if (tokenSpans.length > 0) rows.push({ label: 'tokens', spans: tokenSpans })
    const laneH = rows.length * ROW + 28
    out.push(
      `<g data-lane="${p.pid}" data-peer="${esc(p.peer)}" data-role="${esc(p.role)}">`,
      `<rect x="0" y="${y}" width="${WIDTH}" height="${laneH}" fill="${i % 2 ? '#ffffff' : '#f5f5f5'}"/>`,
      text(8, y + 16, p.role, { 'font-weight': 'bold' }),
      text(8, y + 31, shortId(p.peer), { 'font-size': 10, fill: '#555' }),
    )
    for (const [r, row] of rows.entries()) {
      const ry = y + 8 + r * ROW
      out.push(text(LEFT - 8, ry + ROW - 6, row.label, { 'font-size': 10, 'text-anchor': 'end', fill: '#555' }))
      for (const e of row.spans) {
        const end = e.ts + (e.dur ?? 0)
        if (end < t0 || e.ts > t1) continue
        const sx = x(Math.max(t0, e.ts))
        const w = Math.max(0.6, x(Math.min(t1, end)) - sx)
        const cat = e.cat ?? 'other'
        const h = row.label === 'forward' ? 6 : ROW - 3
        const tip = `${e.name} ${fmtMs((e.dur ?? 0) / 1000)} ms${e.args ? ` ${esc(JSON.stringify(e.args))}` : ''}`
        out.push(
          `<rect data-span="${esc(cat)}" x="${r2(sx)}" y="${r2(ry + (ROW - 3 - h))}" width="${r2(w)}" height="${h}" fill="${COLOURS[cat] ?? COLOURS.other}"` +
            `${row.label === 'tokens' ? ' stroke="#fff" stroke-width="0.5"' : ''}><title>${tip}</title></rect>`,
        )
        if (row.label === 'tokens' && w > 14) {
          out.push(text(sx + w / 2, ry + ROW - 7, String(e.args?.index ?? ''), { 'font-size': 9, fill: '#fff', 'text-anchor': 'middle' }))
        }
      }
    }
    out.push('</g>')
    y += laneH
  }
  y = timeAxis(out, y, t0, spanUs, x, timelineTop)

  // Per-token breakdown of the master's time.
  const breakdown = tokenBreakdown(master.spans)
  y += 30
  y += 14
  out.push(text(LEFT - 230, y, `Per-token time on the master (${master.role})`, { 'font-size': 15, 'font-weight': 'bold' }))
  y += 6
  y = legend(out, y, ['compute', 'allreduce', 'io', 'other'])
  y += 10
  const chartH = 220
  const maxMs = Math.max(1e-3, ...breakdown.map((b) => b.computeMs + b.allreduceMs + b.ioMs + b.otherMs))
  const yTicks = niceTicks(maxMs, 5)
  const top = yTicks[yTicks.length - 1]!
  const yOf = (ms: number): number => y + chartH - (ms / top) * chartH
  out.push('<g data-chart="tokens">')
  for (const v of yTicks) {
    out.push(`<line x1="${LEFT}" x2="${WIDTH - RIGHT}" y1="${r2(yOf(v))}" y2="${r2(yOf(v))}" stroke="#ddd"/>`)
    out.push(text(LEFT - 6, yOf(v) + 4, fmtMs(v), { 'font-size': 10, 'text-anchor': 'end' }))
  }
  out.push(text(LEFT - 60, y + chartH / 2, 'ms per token', { 'font-size': 11, 'text-anchor': 'middle', transform: `rotate(-90 ${LEFT - 60} ${y + chartH / 2})` }))
  const slot = plotW / Math.max(1, breakdown.length)
  const barW = Math.max(1, slot * 0.75)
  const labelEvery = Math.max(1, Math.ceil(24 / slot))
  for (const [i, b] of breakdown.entries()) {
    const bx = LEFT + i * slot + (slot - barW) / 2
    let acc = 0
    out.push(`<g data-token-bar="${b.index}">`)
    for (const [part, ms] of [
      ['compute', b.computeMs],
      ['allreduce', b.allreduceMs],
      ['io', b.ioMs],
      ['other', b.otherMs],
    ] as const) {
      if (ms <= 0) continue
      out.push(
        `<rect data-part="${part}" x="${r2(bx)}" y="${r2(yOf(acc + ms))}" width="${r2(barW)}" height="${r2(yOf(acc) - yOf(acc + ms))}" fill="${COLOURS[part]}">` +
          `<title>token ${b.index}: ${LABELS[part]} ${fmtMs(ms)} ms</title></rect>`,
      )
      acc += ms
    }
    out.push('</g>')
    if (i % labelEvery === 0) out.push(text(bx + barW / 2, y + chartH + 14, String(b.index), { 'font-size': 10, 'text-anchor': 'middle' }))
  }
  out.push(`<line x1="${LEFT}" x2="${WIDTH - RIGHT}" y1="${y + chartH}" y2="${y + chartH}" stroke="#333"/>`)
  out.push(text(LEFT + plotW / 2, y + chartH + 32, 'token index', { 'font-size': 11, 'text-anchor': 'middle' }))
  out.push('</g>')
  y += chartH + 48

  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${y}" viewBox="0 0 ${WIDTH} ${y}" font-family="sans-serif" font-size="12">\n` +
    `<rect width="${WIDTH}" height="${y}" fill="#fff"/>\n${out.join('\n')}\n</svg>\n`
  )
}

/**
 * The master's time per token: the token span split into compute, allreduce wait and I/O wait (the overlap of its
 * forward-thread spans with the token span) and the rest (embedding, head, sampling, sending the input).
 */
export function tokenBreakdown(masterSpans: readonly TraceEvent[]): TokenBreakdown[] {
  const tokens = masterSpans.filter((e) => e.cat === 'token').sort((a, b) => a.ts - b.ts)
  const work = masterSpans.filter((e) => e.cat === 'compute' || e.cat === 'allreduce' || e.cat === 'io')
  return tokens.map((t, i) => {
    const s = t.ts
    const e = t.ts + (t.dur ?? 0)
    const sum = { compute: 0, allreduce: 0, io: 0 }
    for (const w of work) {
      const overlap = Math.min(e, w.ts + (w.dur ?? 0)) - Math.max(s, w.ts)
      if (overlap > 0) sum[w.cat as keyof typeof sum] += overlap
    }
    const totalUs = e - s
    return {
      index: typeof t.args?.index === 'number' ? t.args.index : i,
      computeMs: sum.compute / 1000,
      allreduceMs: sum.allreduce / 1000,
      ioMs: sum.io / 1000,
      otherMs: Math.max(0, totalUs - sum.compute - sum.allreduce - sum.io) / 1000,
    }
  })
}

function peersOf(events: readonly TraceEvent[]): Peer[] {
  const names = new Map<number, string>()
  const spans = new Map<number, TraceEvent[]>()
  for (const e of events) {
    if (e.ph === 'M' && e.name === 'process_name') names.set(e.pid, String(e.args?.name ?? e.pid))
    else if (e.ph === 'X') {
      const list = spans.get(e.pid)
      if (list) list.push(e)
      else spans.set(e.pid, [e])
    }
  }
  const pids = [...new Set([...names.keys(), ...spans.keys()])].sort((a, b) => a - b)
  return pids.map((pid) => {
    const name = names.get(pid) ?? `pid ${pid}`
    const m = /^(master|worker \d+) (.+)$/.exec(name)
    return { pid, name, role: m ? m[1]! : name, peer: m ? m[2]! : '', spans: spans.get(pid) ?? [] }
  })
}

function legend(out: string[], y: number, cats: readonly string[]): number {
  let lx = LEFT
  for (const c of cats) {
    out.push(`<g data-legend="${c}"><rect x="${lx}" y="${y}" width="12" height="12" fill="${COLOURS[c]}"/>`)
    out.push(`${text(lx + 16, y + 10, LABELS[c]!, { 'font-size': 11 })}</g>`)
    lx += 24 + LABELS[c]!.length * 6.2
  }
  return y + 14
}

function timeAxis(out: string[], y: number, t0: number, spanUs: number, x: (ts: number) => number, top: number): number {
  const ticks = niceTicks(spanUs / 1000, 10)
  out.push(`<line x1="${LEFT}" x2="${WIDTH - RIGHT}" y1="${y}" y2="${y}" stroke="#333"/>`)
  for (const ms of ticks) {
    if (ms > spanUs / 1000 + 1e-9) continue
    const tx = x(t0 + ms * 1000)
    out.push(`<line x1="${r2(tx)}" x2="${r2(tx)}" y1="${top}" y2="${y + 4}" stroke="#000" stroke-opacity="0.12"/>`)
    out.push(text(tx, y + 16, fmtMs(ms), { 'font-size': 10, 'text-anchor': 'middle' }))
  }
  out.push(text(LEFT + (WIDTH - LEFT - RIGHT) / 2, y + 32, 'time since the first traced forward pass (ms)', { 'font-size': 11, 'text-anchor': 'middle' }))
  return y + 36
}

/** 0, step, 2·step, … covering `max`, with step 1, 2 or 5 × 10^k and about `count` ticks. */
function niceTicks(max: number, count: number): number[] {
  const raw = max / count
  const mag = 10 ** Math.floor(Math.log10(raw))
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag
  const ticks: number[] = []
  for (let v = 0; v < max + step - 1e-12; v += step) ticks.push(Number(v.toPrecision(12)))
  return ticks
}

function text(x: number, y: number, s: string, attrs: Record<string, string | number> = {}): string {
  const a = Object.entries(attrs)
    .map(([k, v]) => ` ${k}="${v}"`)
    .join('')
  return `<text x="${r2(x)}" y="${r2(y)}"${a}>${esc(s)}</text>`
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;')
}

function r2(v: number): number {
  return Math.round(v * 100) / 100
}

function fmtMs(ms: number): string {
  return ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms >= 1 ? ms.toFixed(2) : ms.toPrecision(2)
}

function shortId(peer: string): string {
  return peer.length > 20 ? `${peer.slice(0, 12)}…${peer.slice(-6)}` : peer
}

/** Registers `edgeshard report` on `program`. */
export function registerReport(program: Command): void {
  program
    .command('report')
    .description('draw a trace written by --trace: a per-peer timeline and a per-token time breakdown, as SVG')
    .argument('<trace>', 'trace file (JSON, from run/serve --trace)')
    .requiredOption('--svg <file>', 'SVG file to write')
    .action((file: string, flags: { svg: string }) => {
      let trace: unknown
      try {
        trace = JSON.parse(readFileSync(file, 'utf8'))
      } catch (err) {
        throw new UsageError(`cannot read trace ${file}: ${(err as Error).message}`, { cause: err })
      }
      writeFileSync(flags.svg, renderTraceSvg(trace))
      process.stderr.write(`edgeshard: report of ${file} written to ${flags.svg}\n`)
    })
}
