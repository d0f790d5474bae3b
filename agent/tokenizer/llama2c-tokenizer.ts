/**
 * llama2.c `tokenizer.bin` reader (karpathy/llama2.c run.c `build_tokenizer`, tokenizer.py `export`).
 */
import { readFileSync } from 'node:fs'
import { TokenizerFormatError, type Vocabulary } from '../../splitter/index.ts'

/** llama2.c hard-codes these ids (run.c: `tokens[n++] = 1` for BOS, EOS = 2). */
const LLAMA2C_BOS_ID = 1
const LLAMA2C_EOS_ID = 2

/**
 * Reads a llama2.c tokenizer file: int32 `max_token_length`, then per token a float32 score, an int32 byte length and
 * that many UTF-8 bytes (little-endian). Pieces keep llama2.c's convention: spaces are ' ' (the exporter replaced
 * sentencepiece's U+2581), byte-fallback pieces are `<0xNN>`, BOS/EOS pieces are `\n<s>\n` / `\n</s>\n`.
 * `vocabSize` comes from the model (llama2.c config.vocab_size); BOS = 1, EOS = 2.
 * Errors: TokenizerFormatError for a missing/unreadable file, a truncated file, a negative or over-long piece
 * length, a piece that is not UTF-8, or bytes left after `vocabSize` tokens (the file belongs to another model).
 * Source: llama2.c run.c `build_tokenizer`.
 */
export function readTokenizerBin(path: string, vocabSize: number): Vocabulary {
  if (!Number.isInteger(vocabSize) || vocabSize < 3) {
    throw new RangeError(`cannot read tokenizer ${path} with vocabSize ${vocabSize}: expected an integer >= 3`)
  }
  let bytes: Buffer
  try {
    bytes = readFileSync(path)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException | undefined)?.code
    const reason =
      code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'is a directory' : `cannot read (${code ?? String(err)})`
    throw new TokenizerFormatError(path, reason, { cause: err })
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const utf8 = new TextDecoder('utf-8', { fatal: true })
  const truncated = (need: number, what: string): never => {
    throw new TokenizerFormatError(
      path,
      `file is ${bytes.byteLength} bytes, reading ${what} needs ${need}: truncated, or vocabSize ${vocabSize} is too large`,
    )
  }
  if (bytes.byteLength < 4) truncated(4, 'max_token_length')
  const maxTokenLength = view.getInt32(0, true)
  if (maxTokenLength <= 0) {
    throw new TokenizerFormatError(path, `max_token_length is ${maxTokenLength}, expected > 0`)
  }
  const tokens: string[] = []
  const scores = new Float32Array(vocabSize)
  let pos = 4
  for (let id = 0; id < vocabSize; id++) {
    if (pos + 8 > bytes.byteLength) truncated(pos + 8, `the score and length of token ${id}`)
    scores[id] = view.getFloat32(pos, true)
    const length = view.getInt32(pos + 4, true)
    pos += 8
    if (length < 0 || length > maxTokenLength) {
      throw new TokenizerFormatError(
        path,
        `token ${id} has length ${length}, expected 0..${maxTokenLength} (max_token_length)`,
      )
    }
    if (pos + length > bytes.byteLength) truncated(pos + length, `the ${length} bytes of token ${id}`)
    try {
      tokens.push(utf8.decode(bytes.subarray(pos, pos + length)))
    } catch (err) {
      throw new TokenizerFormatError(path, `token ${id} is not valid UTF-8`, { cause: err })
    }
    pos += length
  }
  if (pos !== bytes.byteLength) {
    throw new TokenizerFormatError(
      path,
      `${bytes.byteLength - pos} bytes follow token ${vocabSize - 1}: the file holds more than the model's ` +
        `vocab_size ${vocabSize} tokens`,
    )
  }
  return { model: 'llama', tokens, scores, bosId: LLAMA2C_BOS_ID, eosId: LLAMA2C_EOS_ID }
}
