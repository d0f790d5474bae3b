/**
 * `edgeshard synth --shape S --type T --seed N --out FILE.gguf`: a deterministic random-weight model with the exact
 * tensor shapes of a real architecture, streamed to disk (memory stays at one chunk of rows, whatever the size).
 */
import { type Command, InvalidArgumentError, Option } from 'commander'
import { planSynthGguf, SYNTH_SHAPE_NAMES, SYNTH_SHAPES, writeGguf } from '../../splitter/index.ts'
import { UsageError } from '../errors.ts'
import { createProgress } from './progress.ts'
import { checkOutputPath, QUANTIZE_TYPES } from './quantize.ts'

interface SynthFlags {
  shape: string
  type: (typeof QUANTIZE_TYPES)[number]
  seed: number
  out: string
  quiet?: boolean
}

function seedArg(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isSafeInteger(n) || n < 0) {
    throw new InvalidArgumentError(`expected a whole number ≥ 0, got ${JSON.stringify(value)}`)
  }
  return n
}

async function synth(flags: SynthFlags): Promise<void> {
  if (SYNTH_SHAPES[flags.shape] === undefined) {
    throw new UsageError(`unknown --shape ${JSON.stringify(flags.shape)}, expected one of ${SYNTH_SHAPE_NAMES.join(', ')}`)
  }
  checkOutputPath(flags.out)
  const plan = planSynthGguf(flags.shape, { type: flags.type, seed: flags.seed })
  const say = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`edgeshard: ${line}\n`)
  }
  for (const notice of plan.notices) say(`notice: ${notice}`)
  const abort = new AbortController()
  const onSignal = (): void => abort.abort(new Error(`interrupted: ${flags.out} was not written`))
  process.once('SIGINT', onSignal)
  const progress = createProgress(`synth ${flags.shape} ${flags.type}`, flags.quiet ? { quiet: true } : {})
  const startMs = performance.now()
  try {
    const result = await writeGguf(flags.out, plan.metadata, plan.tensors, {
      signal: abort.signal,
      onProgress: (done, total, tensor) => progress.update(done, total, tensor),
    })
    progress.stop()
    say(
      `wrote ${flags.out}: ${flags.shape} ${flags.type} seed ${flags.seed}, ${plan.tensors.length} tensors, ` +
        `${(result.fileBytes / 1e6).toFixed(1)} MB in ${((performance.now() - startMs) / 1000).toFixed(1)} s`,
    )
  } finally {
    progress.stop()
    process.off('SIGINT', onSignal)
  }
}

/** Adds `synth --shape S [--type T] [--seed N] --out FILE [--quiet]` to `program`. */
export function registerSynth(program: Command): void {
  program
    .command('synth')
    .description('write a random-weight GGUF model with the exact tensor shapes of a real architecture')
    .addOption(new Option('--shape <name>', `architecture: ${SYNTH_SHAPE_NAMES.join(', ')}`).makeOptionMandatory())
    .addOption(new Option('--type <type>', '2-D weights (norms and biases stay f32)').choices(QUANTIZE_TYPES).default('q4_0'))
    .addOption(new Option('--seed <s>', 'random seed: the same seed gives the same file').argParser(seedArg).default(0))
    .addOption(new Option('--out <file>', 'GGUF file to write').makeOptionMandatory())
    .option('--quiet', 'no progress or status lines')
    .action(synth)
}
