/**
 * Positional, synchronous access to model files shared by the format readers: open with errors that name the path,
 * and reads that either fill the whole buffer or report how many bytes the file really had.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs'
import { ModelFormatError } from '../errors.ts'

/** An open model file: descriptor and size. Close it with `closeSync(fd)`. */
export interface OpenFile {
  readonly fd: number
  readonly sizeBytes: number
}

/**
 * Opens `path` read-only and returns its descriptor and size.
 * Errors: ModelFormatError when the path does not exist, is a directory or cannot be read.
 */
export function openModelFile(path: string): OpenFile {
  let fd: number
  try {
    fd = openSync(path, 'r')
  } catch (err) {
    throw new ModelFormatError(path, describeOpenError(err), { cause: err })
  }
  try {
    const stat = fstatSync(fd)
    if (stat.isDirectory()) {
      throw new ModelFormatError(path, 'is a directory, expected a model file')
    }
    if (!stat.isFile()) {
      throw new ModelFormatError(path, 'is not a regular file')
    }
    return { fd, sizeBytes: stat.size }
  } catch (err) {
    closeSync(fd)
    throw err
  }
}

/** Runs `fn` with the file open and always closes it. */
export function withModelFile<T>(path: string, fn: (file: OpenFile) => T): T {
  const file = openModelFile(path)
  try {
    return fn(file)
  } finally {
    closeSync(file.fd)
  }
}

/**
 * Reads exactly `lengthBytes` bytes at absolute `positionBytes` into `target` (from its byte 0), looping over short
 * reads. Returns the number of bytes actually read: less than `lengthBytes` only at end of file.
 */
export function readFully(
  fd: number,
  target: Uint8Array,
  lengthBytes: number,
  positionBytes: number,
): number {
  let done = 0
  while (done < lengthBytes) {
    // readSync caps one call at about 2 GiB: chunk large tensors.
    const chunk = Math.min(lengthBytes - done, 1 << 30)
    const n = readSync(fd, target, done, chunk, positionBytes + done)
    if (n === 0) break
    done += n
  }
  return done
}

/** Plain-words reason for a failed `open`, keyed on the Node error code. */
function describeOpenError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException | undefined)?.code
  switch (code) {
    case 'ENOENT':
      return 'no such file'
    case 'EISDIR':
      return 'is a directory, expected a model file'
    case 'EACCES':
    case 'EPERM':
      return 'permission denied'
    case 'ENOTDIR':
      return 'a component of the path is not a directory'
    default:
      return `cannot open (${code ?? String(err)})`
  }
}
