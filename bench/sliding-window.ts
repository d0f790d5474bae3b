/**
 * Sliding-window weight streaming vs resident weights (TPI-LLM §3.3): a synthetic model on N local peers, each with a
 * memory budget, against the same cluster with all weights resident: ms/token, I/O wait per token, window and peak
 * RSS per peer. Prints JSON. `npm run bench:window [-- --shape tinyllama-1.1b --type f16 --peers 4 --budget 300MB]`.
 *
 * Quantized (Q4_0/Q8_0) weights cannot stream at speed with onnxruntime 1.30: MatMulNBits is only fast when its
 * weights are constant initializers (pre-packed), and a session per block costs 0.4–0.7 s to create. The default is
 * therefore an f16 model (weights widened to f32 in the window).
 */
import { cpus, loadavg } from 'node:os'
import { parseArgs } from 'node:util'
import { runSummary, synthModel } from './support.ts'

const { values } = parseArgs({
  options: {
    shape: { type: 'string', default: 'tinyllama-1.1b' },
    type: { type: 'string', default: 'f16' },
    peers: { type: 'string', default: '4' },
    budget: { type: 'string', default: '300MB' },
    tokens: { type: 'string', default: '8' },
  },
})
const model = synthModel(values.shape, values.type)
interface Peer {
  window: number
  forwards: number
  ioWaitMs: number
  computeMs: number
  allreduceMs: number
  peakRssBytes: number
  overheadBytes: number
}
const common = ['run', '--model', model, '--peers', values.peers, '--max-tokens', values.tokens, '--context', '256', '--temperature', '0']
const modes = [
  ['resident', []],
  ['streaming', ['--memory-budget', values.budget]],
] as const
const results = []
for (const [mode, extra] of modes) {
  const s = runSummary<{ msPerToken: number; ttftMs: number; perPeer: Peer[] }>([...common, ...extra], `window-${mode}`)
  results.push({
    mode,
    msPerToken: s.msPerToken,
    ttftMs: s.ttftMs,
    peers: s.perPeer.map((p) => ({
      window: p.window,
      ioWaitMsPerToken: p.ioWaitMs / Math.max(1, p.forwards),
      computeMsPerToken: p.computeMs / Math.max(1, p.forwards),
      peakRssMiB: p.peakRssBytes / 2 ** 20,
      runtimeOverheadMiB: p.overheadBytes / 2 ** 20,
    })),
  })
}
console.log(
  JSON.stringify(
    {
      bench: 'sliding-window',
      model: `${values.shape} ${values.type} (synthetic)`,
      budget: values.budget,
      cgroupLimit: 'not applied',
      pageCache: 'shard files were just written, so reads come from the page cache',
      ratioStreamingToResident: results[1]!.msPerToken / results[0]!.msPerToken,
      cpus: cpus().length,
      loadAverage: loadavg(),
      results,
    },
    null,
    2,
  ),
)
