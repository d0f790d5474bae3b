/**
 * Format detection: one entry point that loads any supported model file into a `ModelDescription`.
 */
import { existsSync, statSync } from 'node:fs'
import { basename, dirname, join } from 'node:path'
import { ModelFormatError } from '../errors.ts'
import type { ModelDescription } from '../model.ts'
import { readGguf } from './gguf.ts'
import { readHfFolder } from './hf-folder.ts'
import {
  decodeLlama2cHeader,
  formatLlama2cHeader,
  LLAMA2C_HEADER_BYTES,
  llama2cHeaderProblem,
  readLlama2c,
} from './llama2c.ts'
import { readFully, withModelFile } from './model-file.ts'

const EXPECTED =
  'expected a GGUF file (magic GGUF) or a llama2.c checkpoint (7 int32 header fields, then fp32 weights)'

/** llama2.c export.py version-1/2 files start with this uint32 ('ak42' little-endian). */
const LLAMA2C_V1_MAGIC = 0x616b3432

/**
 * Loads the description of the model at `path` (no weights are read): a directory with a config.json (or a file
 * inside one: its config.json, model.safetensors, model.safetensors.index.json or a `*.safetensors` shard) is read as
 * a Hugging Face folder (`readHfFolder`); a file starting with the magic `GGUF` as GGUF (`readGguf`); any other file
 * as a llama2.c version-0 checkpoint (`readLlama2c`).
 * Errors: ModelFormatError (or TokenizerFormatError for a HF folder's tokenizer files), one line naming the path:
 * missing file, directory without config.json, empty file, a file that is neither format (text, images, llama2.c
 * version-1 exports), or any error of the format reader.
 * @example
 * const model = loadModel('../shared/models/stories260K.gguf')
 * model.config.nLayers // 5
 */
export function loadModel(path: string): ModelDescription {
  const folder = hfFolderOf(path)
  if (folder !== undefined) return readHfFolder(folder)
  const sniffed = withModelFile(path, ({ fd, sizeBytes }) => {
    if (sizeBytes === 0) throw new ModelFormatError(path, `file is empty, ${EXPECTED}`)
    const head = new Uint8Array(Math.min(sizeBytes, LLAMA2C_HEADER_BYTES))
    readFully(fd, head, head.byteLength, 0)
    return { head, sizeBytes }
  })
  const { head, sizeBytes } = sniffed
  if (head.byteLength >= 4 && String.fromCharCode(...head.subarray(0, 4)) === 'GGUF') return readGguf(path)

  const firstBytes = [...head.subarray(0, 8)].map((b) => b.toString(16).padStart(2, '0')).join(' ')
  if (head.byteLength < LLAMA2C_HEADER_BYTES) {
    throw new ModelFormatError(path, `file is ${sizeBytes} bytes (starting ${firstBytes}), ${EXPECTED}`)
  }
  if (new DataView(head.buffer).getUint32(0, true) === LLAMA2C_V1_MAGIC) {
    throw new ModelFormatError(
      path,
      'is a llama2.c version-1/2 export (magic ak42), supported: the legacy version-0 format (export.py --version 0)',
    )
  }
  const header = decodeLlama2cHeader(head)
  const problem = llama2cHeaderProblem(header)
  if (problem !== undefined) {
    throw new ModelFormatError(
      path,
      `${EXPECTED}; found first bytes ${firstBytes}, which as a llama2.c header give ${problem} ` +
        `(${formatLlama2cHeader(header)})`,
    )
  }
  return readLlama2c(path)
}

/** The Hugging Face folder `path` designates (the directory, or the directory of one of its files), if any. */
function hfFolderOf(path: string): string | undefined {
  let isDir: boolean
  try {
    isDir = statSync(path).isDirectory()
  } catch {
    return undefined // openModelFile reports the missing path
  }
  if (isDir) {
    if (existsSync(join(path, 'config.json'))) return path
    throw new ModelFormatError(
      path,
      'is a directory without config.json, expected a model file (GGUF, llama2.c .bin) or a Hugging Face folder ' +
        '(config.json, model.safetensors, tokenizer.json)',
    )
  }
  const name = basename(path)
  const hfFile = name === 'config.json' || name.endsWith('.safetensors') || name.endsWith('.safetensors.index.json')
  if (!hfFile) return undefined
  if (existsSync(join(dirname(path), 'config.json'))) return dirname(path)
  if (name.endsWith('.json')) return undefined
  throw new ModelFormatError(
    path,
    `is a safetensors file without a config.json beside it: pass the Hugging Face folder (config.json, model.safetensors, tokenizer.json)`,
  )
}
