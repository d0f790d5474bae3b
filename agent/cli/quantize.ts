/**
 * `edgeshard quantize IN OUT --type q4_0|q8_0|f16|f32`: converts any model `loadModel` reads (GGUF, llama2.c, Hugging
 * Face folder) into a GGUF file, the way llama.cpp's `llama-quantize` types tensors (norms and biases stay F32).
 */
import { existsSync, statSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { type Command, Option } from 'commander'
import { type GgufExportType, loadModel, planGgufExport, type Vocabulary, writeGguf } from '../../splitter/index.ts'
import { UsageError } from '../errors.ts'
import { readTokenizerBin } from '../tokenizer/llama2c-tokenizer.ts'
import { createProgress } from './progress.ts'

/** Types `--type` accepts. */
export const QUANTIZE_TYPES: readonly GgufExportType[] = ['q4_0', 'q8_0', 'f16', 'f32']

interface QuantizeFlags {
  type: GgufExportType
  tokenizer?: string
  quiet?: boolean
}

/** Checks that OUT can be created: its folder exists and OUT is not a folder. Errors: UsageError. */
export function checkOutputPath(out: string): void {
  const dir = dirname(resolve(out))
  if (!existsSync(dir) || !statSync(dir).isDirectory()) {
    throw new UsageError(`cannot write ${out}: folder ${dir} does not exist`)
  }
  if (existsSync(out) && statSync(out).isDirectory()) throw new UsageError(`cannot write ${out}: it is a folder`)
}

/**
 * The sentencepiece vocabulary for a model that carries no tokenizer (llama2.c checkpoints): `--tokenizer PATH`, else
 * tok<vocab>.bin, else tokenizer.bin beside the model. Undefined when the model has its own tokenizer and none was
 * given. Errors: UsageError when needed and not found; TokenizerFormatError from the reader.
 */
function llama2cVocabulary(model: ReturnType<typeof loadModel>, explicit: string | undefined): Vocabulary | undefined {
  const vocabSize = model.config.vocabSize
  if (explicit !== undefined) return readTokenizerBin(explicit, vocabSize)
  if (model.format !== 'llama2c') return undefined
  const candidates = [join(dirname(model.path), `tok${vocabSize}.bin`), join(dirname(model.path), 'tokenizer.bin')]
  const path = candidates.find((p) => existsSync(p))
  if (path === undefined) {
    throw new UsageError(
      `no tokenizer for ${model.path}: looked for ${candidates.join(' and ')}; pass --tokenizer PATH (a llama2.c tokenizer.bin)`,
    )
  }
  return readTokenizerBin(path, vocabSize)
}

async function quantize(input: string, output: string, flags: QuantizeFlags): Promise<void> {
  checkOutputPath(output)
  const model = loadModel(input)
  const vocab = llama2cVocabulary(model, flags.tokenizer)
  const plan = planGgufExport(model, { type: flags.type, ...(vocab !== undefined ? { vocab } : {}) })
  if (!plan.hasTokenizer) {
    throw new UsageError(`no tokenizer for ${input}: the model carries none; pass --tokenizer PATH (a llama2.c tokenizer.bin)`)
  }
  const say = (line: string): void => {
    if (!flags.quiet) process.stderr.write(`edgeshard: ${line}\n`)
  }
  for (const notice of plan.notices) say(`notice: ${notice}`)
  const abort = new AbortController()
  const onSignal = (): void => abort.abort(new Error(`interrupted: ${output} was not written`))
  process.once('SIGINT', onSignal)
  const progress = createProgress(`quantize ${output}`, flags.quiet ? { quiet: true } : {})
  const startMs = performance.now()
  try {
    const result = await writeGguf(output, plan.metadata, plan.tensors, {
      signal: abort.signal,
      onProgress: (done, total, tensor) => progress.update(done, total, tensor),
    })
    progress.stop()
    say(
      `wrote ${output}: ${plan.tensors.length} tensors, ${flags.type}, ${(result.fileBytes / 1e6).toFixed(1)} MB in ` +
        `${((performance.now() - startMs) / 1000).toFixed(1)} s`,
    )
  } finally {
    progress.stop()
    process.off('SIGINT', onSignal)
  }
}

/** Adds `quantize IN OUT --type T [--tokenizer PATH] [--quiet]` to `program`. */
export function registerQuantize(program: Command): void {
  program
    .command('quantize')
    .description('convert a model (GGUF, llama2.c .bin, Hugging Face folder) into a GGUF file of another tensor type')
    .argument('<in>', 'model to convert')
    .argument('<out>', 'GGUF file to write (written to <out>.tmp, renamed when complete)')
    .addOption(
      new Option('--type <type>', '2-D weights: q4_0, q8_0, f16 or f32 (norms and biases stay f32)')
        .choices(QUANTIZE_TYPES)
        .makeOptionMandatory(),
    )
    .option('--tokenizer <path>', 'llama2.c tokenizer.bin (default: tok<vocab>.bin or tokenizer.bin beside a .bin model)')
    .option('--quiet', 'no progress or status lines')
    .action(quantize)
}
