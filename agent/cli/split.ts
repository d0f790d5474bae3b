/**
 * `edgeshard split serve|run|plan`: split computing of an ONNX model between this device (head) and a server (tail)
 * over libp2p, after BottleFit (Matsubara et al. 2022): cut anywhere, code the bottleneck, pick the cut by profile.
 *
 *   edgeshard split serve --model M [--listen ADDR]
 *   edgeshard split run   --model M --server ADDR --input FILE [--cut auto|local|offload|#K|T1,T2] [--codec C] [--link 1mbit:20ms]
 *   edgeshard split plan  --model M --input FILE [--server ADDR | --link 1gbit:1ms] [--device-slowdown S]
 */
import { writeFileSync } from 'node:fs'
import { loadavg } from 'node:os'
import { type Command, InvalidArgumentError, Option } from 'commander'
import {
  type CutCandidate,
  type DeviceProfile,
  type LinkProfile,
  type PlannedOption,
  Replanner,
  type SplitPlan,
} from '../../splitter/index.ts'
import { type BottleneckCodec, codecName, type LinkEmulation, parseCodec, parseLinkEmulation } from '../../transport/index.ts'
import { UsageError } from '../errors.ts'
import type { TypedTensor } from '../runtime.ts'
import { type HeadClientOptions, SplitHeadClient } from '../split/head-client.ts'
import { readInputFile, readLabels } from '../split/inputs.ts'
import { DEFAULT_MAX_CANDIDATES, type ProfiledPlan, profileAndPlan } from '../split/planning.ts'
import { candidateLabel, defaultMetric, predictions, sliceItems } from '../split/profile.ts'
import { SplitModel } from '../split/split-model.ts'
import { SplitTailServer } from '../split/tail-server.ts'
import { byteSize, collect, finiteNumber, wholeNumber } from './arguments.ts'
import { addSecurityOptions, describeRefusal, loadSecurity, type SecurityFlags } from './security.ts'

/** Codecs the planner tries by default. */
export const DEFAULT_SPLIT_CODECS = ['f32', 'f32+zstd', 'f16', 'q8', 'q8+deflate', 'q8+brotli', 'q8+zstd', 'q8c+deflate', 'q4+deflate']

/** Errors of cutting and planning are bad input (exit code 2). */
const CUT_ERRORS = new Set(['CutError', 'ControlFlowCutError', 'LocalFunctionCutError', 'PlanError'])

function codecArg(value: string): BottleneckCodec {
  try {
    return parseCodec(value)
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
}

function linkArg(value: string): LinkEmulation {
  try {
    return parseLinkEmulation(value)
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message)
  }
}

function numberList(value: string): number[] {
  const list = value.split(',').map((v) => Number(v.trim()))
  if (list.length === 0 || list.some((n) => !Number.isFinite(n))) throw new InvalidArgumentError(`expected comma-separated numbers, got ${JSON.stringify(value)}`)
  return list
}

function fraction(value: string): number {
  const n = finiteNumber(value)
  if (n < 0 || n > 1) throw new InvalidArgumentError(`expected a number in [0, 1], got ${value}`)
  return n
}

function positive(value: string): number {
  const n = finiteNumber(value)
  if (!(n > 0)) throw new InvalidArgumentError(`expected a positive number, got ${value}`)
  return n
}

/** Runs `fn`, turning cut and plan errors into UsageError (exit 2) with the same message. */
async function asUsage<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn()
  } catch (err) {
    if (err instanceof Error && CUT_ERRORS.has(err.name)) throw new UsageError(err.message, { cause: err })
    throw err
  }
}

interface InputFlags {
  model: string
  input: string
  inputType: 'u8' | 'f32'
  mean?: number[]
  std?: number[]
  shape?: number[]
  offset: number
  count?: number
  threads: number
  quiet?: boolean
}

interface PlanFlags extends InputFlags, SecurityFlags {
  server?: string
  link?: LinkEmulation
  codecs: BottleneckCodec[]
  calibration: number
  deviceSlowdown: number
  deviceMemory?: number
  serverSlowdown: number
  minAgreement: number
  maxCandidates: number
  repeats: number
  json?: string | boolean
  all?: boolean
}

interface RunFlags extends PlanFlags {
  cut: string
  codec: BottleneckCodec
  labels?: string
  batch: number
  replanFraction: number
  replanEvery: number
  dumpOutputs?: string
  summaryJson?: string
}

function addInputOptions(command: Command): Command {
  return command
    .requiredOption('--model <path>', 'ONNX model (external data is read from beside it)')
    .requiredOption('--input <file>', 'raw input items back to back (u8 pixels or f32 values), no header')
    .addOption(new Option('--input-type <type>', 'element type in the input file').choices(['u8', 'f32']).default('u8'))
    .addOption(new Option('--mean <m>', 'u8 normalisation mean(s): x = (p/255 − mean) / std (one value or one per channel)').argParser(numberList))
    .addOption(new Option('--std <s>', 'u8 normalisation std(s)').argParser(numberList))
    .addOption(new Option('--shape <dims>', 'dims of one item when the model input is dynamic, e.g. 3,64,64').argParser(numberList))
    .addOption(new Option('--offset <n>', 'first item to read').argParser(wholeNumber(0)).default(0))
    .addOption(new Option('--count <n>', 'items to read (default: all)').argParser(wholeNumber(1)))
    .addOption(new Option('--threads <n>', 'onnxruntime threads').argParser(wholeNumber(1)).default(1))
    .option('--quiet', 'no status lines on stderr')
}

function addPlanOptions(command: Command): Command {
  addSecurityOptions(command) // identity and membership towards --server
  return command
    .addOption(new Option('--link <rate:rtt>', 'emulate this link (userspace delay + rate), e.g. 1mbit:20ms; without --server: the link to plan for').argParser(linkArg))
    .addOption(new Option('--codecs <list>', 'bottleneck codecs the planner tries (quantization[+compression[:level]])').argParser((v, prev: BottleneckCodec[] | undefined) => [...(prev ?? []), ...collect(v, undefined).map(codecArg)]))
    .addOption(new Option('--calibration <n>', 'calibration items (the first of --input) for agreement').argParser(wholeNumber(1)).default(64))
    .addOption(new Option('--device-slowdown <s>', 'this device is S times slower than where the head was profiled (planning what-if)').argParser(positive).default(1))
    .addOption(new Option('--device-memory <bytes>', 'model bytes the device can hold (e.g. 512KB): larger heads are infeasible').argParser(byteSize))
    .addOption(new Option('--server-slowdown <s>', 'the server is S times slower than measured').argParser(positive).default(1))
    .addOption(new Option('--min-agreement <a>', 'least top-1 agreement with the unsplit model on calibration items').argParser(fraction).default(0.99))
    .addOption(new Option('--max-candidates <n>', 'profile at most N cuts (those with the fewest crossing bytes)').argParser(wholeNumber(1)).default(DEFAULT_MAX_CANDIDATES))
    .addOption(new Option('--repeats <n>', 'timed runs per measurement (median kept)').argParser(wholeNumber(1)).default(9))
}

async function loadInputs(flags: InputFlags): Promise<{ model: SplitModel; input: TypedTensor }> {
  const model = await SplitModel.load(flags.model, { threads: flags.threads })
  if (model.inputs.length !== 1) throw new UsageError(`model ${flags.model} has ${model.inputs.length} inputs; split run reads one input file`)
  const input = await readInputFile(flags.input, model.inputs[0]!, {
    type: flags.inputType,
    ...(flags.mean ? { mean: flags.mean } : {}),
    ...(flags.std ? { std: flags.std } : {}),
    ...(flags.shape ? { shape: flags.shape } : {}),
    offset: flags.offset,
    ...(flags.count === undefined ? {} : { count: flags.count }),
  })
  return { model, input }
}

function devices(flags: PlanFlags): { device: DeviceProfile; server: DeviceProfile } {
  return {
    device: { name: 'device', slowdown: flags.deviceSlowdown, ...(flags.deviceMemory === undefined ? {} : { memoryBytes: flags.deviceMemory }) },
    server: { name: 'server', slowdown: flags.serverSlowdown },
  }
}

function fmt(n: number, digits = 2): string {
  return n.toFixed(digits)
}

/**
 * The plan as a table: the Pareto front (P), the best local/offload rows and the choice (*), every row with `all`;
 * x marks options below the agreement bound or too big for the device.
 */
export function planTable(plan: SplitPlan, all = false): string {
  const bestOf = (kind: PlannedOption['kind']): PlannedOption | undefined => plan.rows.find((r) => r.kind === kind && r.feasible) ?? plan.rows.find((r) => r.kind === kind)
  const shown = all ? plan.rows : plan.rows.filter((r) => r.pareto || r === plan.choice || r === bestOf('local') || r === bestOf('offload'))
  const header = ['', '#', 'cut', 'codec', 'bytes', 'device ms', 'link ms', 'server ms', 'total ms', 'agree', 'device bytes']
  const rows = shown.map((r) => [
    `${r === plan.choice ? '*' : r.pareto ? 'P' : ''}${r.feasible ? '' : 'x'}`,
    String(r.candidate),
    r.label.length > 48 ? `${r.label.slice(0, 45)}...` : r.label,
    r.codec,
    String(r.bytes),
    fmt(r.deviceMs),
    fmt(r.transferMs),
    fmt(r.serverMs),
    fmt(r.totalMs),
    fmt(r.agreement, 4),
    String(r.deviceBytes),
  ])
  const table = [header, ...rows]
  const widths = header.map((_, c) => Math.max(...table.map((r) => r[c]!.length)))
  return table.map((r) => `${r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd()}\n`).join('')
}

function describeLink(link: LinkProfile): string {
  return `${fmt(link.bitsPerSecond / 1e6, 3)} Mbit/s, rtt ${fmt(link.rttMs)} ms`
}

async function planWith(model: SplitModel, input: TypedTensor, flags: PlanFlags, client: SplitHeadClient | undefined, say: (l: string) => void): Promise<ProfiledPlan> {
  const calibration = { [model.inputs[0]!.name]: sliceItems(input, 0, Math.min(flags.calibration, input.dims[0]!)) }
  if (!client && !flags.link) throw new UsageError('give --server ADDR (measure the link and the server) or --link RATE:RTT (plan offline)')
  const { device, server } = devices(flags)
  say(`profiling cuts of ${model.path} (${model.nodeCount} nodes) on ${calibration[model.inputs[0]!.name]!.dims[0]} calibration items`)
  let lastReport = 0
  return asUsage(() =>
    profileAndPlan(model, {
      calibration,
      codecs: flags.codecs,
      ...(client ? { client } : {}),
      ...(flags.link && !client ? { link: flags.link } : {}),
      device,
      server,
      minAgreement: flags.minAgreement,
      maxCandidates: flags.maxCandidates,
      repeats: flags.repeats,
      onCandidate: (done, total) => {
        if (done === total || performance.now() - lastReport > 2000) {
          lastReport = performance.now()
          say(`profiled ${done}/${total} cuts`)
        }
      },
    }),
  )
}

function planSummary(p: ProfiledPlan): Record<string, unknown> {
  return {
    model: p.profile.model,
    link: p.link,
    device: p.plan.device,
    server: p.plan.server,
    minAgreement: p.plan.minAgreement,
    fullMsHere: p.profile.fullMs,
    ...(p.serverFullMs === undefined ? {} : { fullMsOnServer: p.serverFullMs }),
    choice: p.plan.choice,
    rows: p.plan.rows,
  }
}

async function plan(flags: PlanFlags): Promise<void> {
  const say = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`edgeshard split: ${line}\n`)
  }
  const { model, input } = await loadInputs(flags)
  const client = flags.server ? await SplitHeadClient.connect(model, flags.server, { ...(flags.link ? { link: flags.link } : {}), transport: await headTransport(flags) }) : undefined
  try {
    const p = await planWith(model, input, flags, client, say)
    if (flags.json) {
      const text = `${JSON.stringify(planSummary(p), null, 2)}\n`
      if (typeof flags.json === 'string') writeFileSync(flags.json, text)
      else process.stdout.write(text)
      if (typeof flags.json !== 'string') return
    }
    process.stdout.write(`link: ${describeLink(p.link)}${client ? ' (measured)' : ' (given)'}; device slowdown ${flags.deviceSlowdown}; min agreement ${flags.minAgreement}\n`)
    process.stdout.write(planTable(p.plan, flags.all))
    const c = p.plan.choice
    process.stdout.write(`choice: #${c.candidate} ${c.label} ${c.codec}: ${fmt(c.totalMs)} ms, ${c.bytes} bytes, agreement ${fmt(c.agreement, 4)}\n`)
  } finally {
    await client?.close()
    await model.release()
  }
}

/** The candidate an explicit `--cut` names. @throws UsageError */
function explicitCandidate(spec: string, candidates: readonly CutCandidate[]): CutCandidate {
  if (spec === 'local') return candidates.at(-1)!
  if (spec === 'offload') return candidates[0]!
  if (spec.startsWith('#')) {
    const k = Number(spec.slice(1))
    const c = candidates[k]
    if (!Number.isInteger(k) || !c) throw new UsageError(`--cut ${spec}: candidates are #0 … #${candidates.length - 1}`)
    return c
  }
  const names = spec.split(',').map((s) => s.trim()).filter(Boolean)
  const match = candidates.find((c) => c.crossing.length === names.length && names.every((n) => c.crossing.includes(n)))
  if (match) return match
  // a cut that is not a topological prefix (a subset of some candidate's crossing): cut it directly
  return { index: -1, kind: 'cut', after: null, afterOp: null, crossing: names, bytes: 0, bytesPerItem: 0 }
}

async function run(flags: RunFlags): Promise<void> {
  const say = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`edgeshard split: ${line}\n`)
  }
  const { model, input } = await loadInputs(flags)
  const inputName = model.inputs[0]!.name
  const count = input.dims[0]!
  const labels = flags.labels ? await readLabels(flags.labels, flags.offset, count) : undefined
  const wantsServer = flags.cut !== 'local'
  if (wantsServer && !flags.server) throw new UsageError('give --server ADDR (a running `edgeshard split serve`), or --cut local')
  const client = wantsServer ? await SplitHeadClient.connect(model, flags.server!, { ...(flags.link ? { link: flags.link } : {}), transport: await headTransport(flags) }) : undefined
  const metric = defaultMetric(model)
  const outputsFile: Float32Array[] = []
  try {
    let replanner: Replanner | undefined
    let observation = (await model.probe({ [inputName]: sliceItems(input, 0, Math.min(flags.batch, count)) })).observation
    let candidate: CutCandidate
    let codec = flags.codec
    if (flags.cut === 'auto') {
      const p = await planWith(model, input, flags, client, say)
      const { device, server } = devices(flags)
      replanner = new Replanner({ options: p.options, link: p.link, device, server, minAgreement: flags.minAgreement }, flags.replanFraction)
      say(`link ${describeLink(p.link)}; plan: #${p.plan.choice.candidate} ${p.plan.choice.label} ${p.plan.choice.codec} (${fmt(p.plan.choice.totalMs)} ms predicted)`)
      candidate = model.candidates(p.observation)[p.plan.choice.candidate]!
      codec = p.plan.choice.codec === '-' ? flags.codec : parseCodec(p.plan.choice.codec)
    } else {
      candidate = await asUsage(async () => explicitCandidate(flags.cut, model.candidates(observation)))
    }
    if (flags.batch !== 1) observation = (await model.probe({ [inputName]: sliceItems(input, 0, Math.min(flags.batch, count)) })).observation
    const useCut = async (c: CutCandidate, k: BottleneckCodec): Promise<void> => {
      await asUsage(async () => {
        if (client) await client.setCut({ candidate: c, codec: k }, observation)
      })
      candidate = c
      codec = k
      say(`using cut #${c.index} ${candidateLabel(c)} with ${c.kind === 'local' ? 'no codec' : codecName(k)}`)
    }
    await useCut(candidate, codec)
    const full = candidate.kind === 'local' && !client ? await model.fullSession() : undefined
    let correct = 0
    let requestBytes = 0
    let totalMs = 0
    let replans = 0
    let requests = 0
    for (let start = 0; start < count; start += flags.batch) {
      const n = Math.min(flags.batch, count - start)
      const feeds = { [inputName]: sliceItems(input, start, n) }
      let outputs: Record<string, TypedTensor>
      if (full) {
        const t0 = performance.now()
        outputs = await full.run(feeds)
        totalMs += performance.now() - t0
      } else {
        const r = await client!.infer(feeds)
        outputs = r.outputs
        requestBytes += r.timing.requestBytes
        totalMs += r.timing.totalMs
      }
      requests++
      const first = outputs[model.outputs[0]!.name]!
      if (flags.dumpOutputs) outputsFile.push(Float32Array.from(first.data as Float32Array))
      if (metric.kind === 'top1' && first.dims.length === 2) {
        const classes = predictions(first, metric)
        for (let i = 0; i < n; i++) {
          const label = labels?.[start + i]
          if (label !== undefined && label === classes[i]) correct++
          process.stdout.write(`${flags.offset + start + i}\t${classes[i]}${label === undefined ? '' : `\t${label}`}\n`)
        }
      }
      if (replanner && client && requests % flags.replanEvery === 0 && start + n < count) {
        const next = replanner.observe(await client.measureLink())
        if (next) {
          replans++
          say(`link moved to ${describeLink(next.link)}: re-planned to #${next.choice.candidate} ${next.choice.label} ${next.choice.codec}`)
          const c = model.candidates(observation)[next.choice.candidate]!
          await useCut(c, next.choice.codec === '-' ? codec : parseCodec(next.choice.codec))
        }
      }
    }
    if (flags.dumpOutputs) {
      const total = outputsFile.reduce((a, b) => a + b.length, 0)
      const all = new Float32Array(total)
      let at = 0
      for (const o of outputsFile) {
        all.set(o, at)
        at += o.length
      }
      writeFileSync(flags.dumpOutputs, all)
    }
    const summary = {
      model: model.path,
      items: count,
      cut: { index: candidate.index, kind: candidate.kind, crossing: candidate.crossing },
      codec: candidate.kind === 'local' ? null : codecName(codec),
      requestBytesPerItem: requestBytes / count,
      msPerItem: totalMs / count,
      ...(labels ? { top1: correct / count } : {}),
      replans,
      loadAverage: loadavg()[0],
    }
    if (flags.summaryJson) writeFileSync(flags.summaryJson, `${JSON.stringify(summary, null, 2)}\n`)
    say(
      `${count} items via #${candidate.index} ${candidateLabel(candidate)}${candidate.kind === 'local' ? '' : ` ${codecName(codec)}`}: ` +
        `${fmt(requestBytes / count, 1)} bytes/item sent, ${fmt(totalMs / count, 3)} ms/item` +
        `${labels ? `, top-1 ${fmt((100 * correct) / count)} %` : ''}, ${replans} re-plans, load ${fmt(loadavg()[0]!)}`,
    )
  } finally {
    await client?.close()
    await model.release()
  }
}

/** The head's identity and membership (its own key file, --trust, --psk). */
async function headTransport(flags: SecurityFlags): Promise<NonNullable<HeadClientOptions['transport']>> {
  const security = await loadSecurity(flags, 'master')
  return { privateKey: security.identity.privateKey, ...(security.membership ? { membership: security.membership } : {}) }
}

async function serve(flags: { model: string; listen?: string[]; threads: number } & SecurityFlags): Promise<void> {
  const security = await loadSecurity(flags, 'agent', {
    onRefused: (refusal) => process.stderr.write(`edgeshard split serve: ${describeRefusal(refusal, security.membership)}\n`),
  })
  const model = await SplitModel.load(flags.model, { threads: flags.threads })
  const server = new SplitTailServer(model, {
    transport: { privateKey: security.identity.privateKey, ...(security.membership ? { membership: security.membership } : {}) },
    listen: flags.listen ?? ['/ip4/0.0.0.0/tcp/0'],
    onSessionEnd: (peer, error) => {
      if (error) process.stderr.write(`edgeshard split serve: session with ${peer} ended: ${error.message}\n`)
    },
  })
  await server.start()
  for (const addr of server.multiaddrs()) process.stdout.write(`listening ${addr}\n`)
  await new Promise<void>((resolve) => {
    process.once('SIGTERM', resolve)
    process.once('SIGINT', resolve)
  })
  await server.stop().catch(() => {})
  await model.release().catch(() => {})
  process.exit(0)
}

/** Registers `edgeshard split serve|run|plan` on `program`. */
export function registerSplit(program: Command): void {
  const split = program.command('split').description('split computing: run the head of an ONNX model here and its tail on a server (BottleFit)')

  addSecurityOptions(
    split
      .command('serve')
      .description('serve tails of a model: print the listening multiaddrs and answer head peers')
      .requiredOption('--model <path>', 'ONNX model (the same file as the head peers)')
      .option('--listen <addr>', 'multiaddr to listen on (repeatable, comma-separated)', collect)
      .addOption(new Option('--threads <n>', 'onnxruntime threads').argParser(wholeNumber(1)).default(1)),
  ).action(serve)

  addPlanOptions(
    addInputOptions(
      split
        .command('run')
        .description('run items through the model split with a server; prints "<item>\\t<class>[\\t<label>]" per item')
        .option('--server <addr>', 'multiaddr of `edgeshard split serve` (not needed with --cut local)')
        .option('--cut <spec>', 'auto (plan), local, offload, #K (candidate K), or crossing tensor names T1,T2', 'auto')
        .addOption(new Option('--codec <codec>', 'bottleneck codec for an explicit --cut').argParser(codecArg).default(parseCodec('q8+deflate'), 'q8+deflate'))
        .option('--labels <file>', 'raw u8 labels of the items: report top-1 accuracy')
        .addOption(new Option('--batch <n>', 'items per request').argParser(wholeNumber(1)).default(1))
        .addOption(new Option('--replan-fraction <f>', 'with --cut auto: re-plan when the measured rate or rtt moves by more than this fraction').argParser(positive).default(0.5))
        .addOption(new Option('--replan-every <n>', 'with --cut auto: measure the link every N requests').argParser(wholeNumber(1)).default(32))
        .option('--dump-outputs <file>', 'write the first output of every item as raw f32')
        .option('--summary-json <file>', 'write the run summary as JSON'),
    ),
  ).action((flags: RunFlags) => run({ ...flags, codecs: flags.codecs ?? DEFAULT_SPLIT_CODECS.map(parseCodec) }))

  addPlanOptions(
    addInputOptions(
      split
        .command('plan')
        .description('profile every cut and print the Pareto table (latency vs bytes vs agreement) and the choice')
        .option('--server <addr>', 'multiaddr of `edgeshard split serve`: measure the link and its tail times')
        .option('--json [file]', 'print (or write) the plan as JSON')
        .option('--all', 'print every option, not only the Pareto front'),
    ),
  ).action((flags: PlanFlags) => plan({ ...flags, codecs: flags.codecs ?? DEFAULT_SPLIT_CODECS.map(parseCodec) }))
}
