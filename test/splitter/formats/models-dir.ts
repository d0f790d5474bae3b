/** Test helper: where the shared model files live (`../shared/models` from the repo root), and whether they do. */
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

/** /work/main/test/splitter/formats → /work/shared/models (the repo's sibling folder `shared`). */
export const MODELS_DIR = fileURLToPath(new URL('../../../../shared/models/', import.meta.url))
export const STORIES_BIN = join(MODELS_DIR, 'stories260K.bin')
export const STORIES_GGUF = join(MODELS_DIR, 'stories260K.gguf')
export const TOK512 = join(MODELS_DIR, 'tok512.bin')
export const REFERENCE_JSON = join(MODELS_DIR, 'stories260K.reference.json')

/** True when all stories260K files are present; otherwise the golden tests skip and say why. */
export const HAVE_MODELS = [STORIES_BIN, STORIES_GGUF, TOK512, REFERENCE_JSON].every((p) => existsSync(p))
export const SKIP_REASON = `shared model files not found in ${MODELS_DIR} (stories260K.bin/.gguf, tok512.bin, reference json): skipping golden tests`
