/**
 * Decode speed of a quantized model at real scale: TinyLlama-1.1B shape, Q4_0 (synthetic), N = 1 and 2 peers on this
 * machine, each peer pinned to its own core: decode ms/token, TTFT for a ~128-token prompt, and the weight bytes read per token divided by the time,
 * next to the memory bandwidth measured in the same run. Prints JSON. `npm run bench:quantized`.
 */
import { statSync } from 'node:fs'
import { cpus, loadavg } from 'node:os'
import { loadModel } from '../splitter/index.ts'
import { memoryBandwidthGBs, runSummary, synthModel } from './support.ts'

const model = synthModel('tinyllama-1.1b', 'q4_0')
const description = loadModel(model)
// Every weight is read once per token except the embedding, of which one row is read.
const embedding = description.tensors.get('token_embd.weight')!.byteLength
let weightBytes = 0
for (const t of description.tensors.values()) weightBytes += t.byteLength
const weightBytesPerToken = weightBytes - embedding

// About 128 tokens with the synthetic vocabulary.
const prompt = `${'The little robot walked along the quiet river and counted the stones one by one. '.repeat(4)}The little robot walked along the quiet river`
const bandwidth = await memoryBandwidthGBs(cpus().length)
const rows = []
// The CLI default (int8 activations, llama.cpp's arithmetic) on 1 and 2 peers, then exact f32 activations on 1.
for (const [peers, matmul] of [[1, 'int8'], [2, 'int8'], [1, 'exact']] as const) {
  const s = runSummary<{ msPerToken: number; ttftMs: number; promptTokens: number[]; generated: number; decodeSplit: Record<string, number> }>(
    ['run', '--model', model, '--peers', String(peers), '--prompt', prompt, '--max-tokens', '32', '--context', '512', '--temperature', '0', '--pin-cores', '--quantized-matmul', matmul],
    `quantized-${peers}-${matmul}`,
  )
  const gbs = weightBytesPerToken / (s.msPerToken / 1000) / 1e9
  rows.push({
    peers,
    quantizedMatmul: matmul,
    promptTokens: s.promptTokens.length,
    generated: s.generated,
    decodeMsPerToken: s.msPerToken,
    ttftMs: s.ttftMs,
    weightGBsPerToken: gbs,
    fractionOfMeasuredBandwidth: gbs / bandwidth,
    // The master's decode time per token: layers and head in onnxruntime, allreduce wait, everything else.
    decodeSplitMs: s.decodeSplit,
  })
}
console.log(
  JSON.stringify(
    {
      bench: 'quantized-decode',
      model: 'tinyllama-1.1b q4_0 (synthetic)',
      fileBytes: statSync(model).size,
      weightBytesPerToken,
      memoryBandwidthGBs: bandwidth,
      cpus: cpus().length,
      loadAverage: loadavg(),
      results: rows,
    },
    null,
    2,
  ),
)
