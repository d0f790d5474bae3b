/**
 * Picks and builds the master's tokenizer for a loaded model.
 */
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import type { ModelDescription } from '../../splitter/index.ts'
import { UsageError } from '../errors.ts'
import { HfTokenizer } from './hf-tokenizer.ts'
import { readTokenizerBin } from './llama2c-tokenizer.ts'
import { SpmTokenizer } from './spm-tokenizer.ts'

/** Either tokenizer; both satisfy the generation loop's `TextCodec`. */
export type MasterTokenizer = SpmTokenizer | HfTokenizer

/**
 * The tokenizer for `model`, in this order:
 * 1. `explicitPath` (the CLI's `--tokenizer`): a llama2.c tokenizer.bin → SpmTokenizer;
 * 2. `model.vocab` (GGUF `llama` vocabularies) → SpmTokenizer;
 * 3. `model.tokenizerJson` (HF folders, GGUF `gpt2` vocabularies) → HfTokenizer with the model's bos/eos ids;
 * 4. a llama2.c `tok<vocab>.bin`, then `tokenizer.bin`, beside the model file (inside a HF folder) → SpmTokenizer.
 * Errors: UsageError (one line) naming what was looked for when nothing fits; TokenizerFormatError from the readers.
 */
export function loadTokenizer(model: ModelDescription, explicitPath?: string): MasterTokenizer {
  const vocabSize = model.config.vocabSize
  if (explicitPath !== undefined) {
    return new SpmTokenizer(readTokenizerBin(explicitPath, vocabSize), { source: explicitPath })
  }
  if (model.vocab !== undefined) return new SpmTokenizer(model.vocab, { source: model.path })
  if (model.tokenizerJson !== undefined) {
    return new HfTokenizer(model.tokenizerJson, {
      source: model.format === 'safetensors' ? join(model.path, 'tokenizer.json') : model.path,
      ...(model.bosId !== undefined ? { bosId: model.bosId } : {}),
      ...(model.eosId !== undefined ? { eosId: model.eosId } : {}),
    })
  }
  const dir = model.format === 'safetensors' ? model.path : dirname(model.path)
  const candidates = [join(dir, `tok${vocabSize}.bin`), join(dir, 'tokenizer.bin')]
  const path = candidates.find((p) => existsSync(p))
  if (path === undefined) {
    throw new UsageError(
      `no tokenizer for ${model.path}: it carries no vocabulary, and there is no ${candidates.join(' or ')}; ` +
        'pass --tokenizer PATH (a llama2.c tokenizer.bin)',
    )
  }
  return new SpmTokenizer(readTokenizerBin(path, vocabSize), { source: path })
}
