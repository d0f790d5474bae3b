/**
 * Generation benchmark on stories260K: ms/token, TTFT, allreduces and wire bytes per token for N = 1..4 peers
 * (real processes over libp2p on 127.0.0.1). Prints one JSON document. Usage: `npm run bench [-- --tokens 200]`.
 */
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync } from 'node:fs'
import { cpus, loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const { values } = parseArgs({
  options: {
    model: { type: 'string', default: fileURLToPath(new URL('../../shared/models/stories260K.bin', import.meta.url)) },
    tokens: { type: 'string', default: '200' },
    peers: { type: 'string', default: '1,2,3,4' },
    repeats: { type: 'string', default: '3' },
  },
})
if (!existsSync(values.model)) {
  console.error(`bench: model ${values.model} not found; pass --model PATH`)
  process.exit(2)
}
const cli = fileURLToPath(new URL('../agent/cli.ts', import.meta.url))
const dir = mkdtempSync(join(tmpdir(), 'edgeshard-bench-'))
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

const results = []
for (const peers of values.peers.split(',').map(Number)) {
  const runs: Record<string, number>[] = []
  for (let r = 0; r < Number(values.repeats); r++) {
    const summaryPath = join(dir, `${peers}-${r}.json`)
    const p = spawnSync(
      process.execPath,
      [cli, 'run', '--model', values.model, '--peers', String(peers), '--max-tokens', values.tokens, '--temperature', '0',
        '--context', '512', '--quiet', '--summary-json', summaryPath],
      { encoding: 'utf8' },
    )
    if (p.status !== 0) {
      console.error(`bench: run with ${peers} peers failed: ${p.stderr}`)
      process.exit(1)
    }
    runs.push(JSON.parse(readFileSync(summaryPath, 'utf8')) as Record<string, number>)
  }
  results.push({
    peers,
    generatedTokens: runs[0]!.generated,
    msPerToken: median(runs.map((s) => s.msPerToken!)),
    ttftMs: median(runs.map((s) => s.ttftMs!)),
    allreducesPerToken: runs[0]!.allreducesPerToken,
    wireBytesPerToken: Math.round(median(runs.map((s) => s.wireBytesPerToken!))),
    masterComputeMsPerToken: median(runs.map((s) => s.computeMs! / s.generated!)),
    masterAllreduceWaitMsPerToken: median(runs.map((s) => s.allreduceWaitMs! / s.generated!)),
    runs: runs.length,
  })
}
console.log(
  JSON.stringify(
    { bench: 'generate', model: values.model, cpus: cpus().length, loadAverage: loadavg(), node: process.version, results },
    null,
    2,
  ),
)
