/**
 * safetensors files (huggingface/safetensors, format described in its README): a little-endian u64 header length N,
 * N bytes of JSON `{ name: { dtype, shape, data_offsets: [begin, end] }, "__metadata__"?: { string: string } }`, then
 * the data section; offsets are relative to its start (byte 8 + N). Only the header is read; tensors stay offsets.
 */
import { ModelFormatError } from '../errors.ts'
import type { DType } from '../model.ts'
import { readFully, withModelFile } from './model-file.ts'

/** One tensor of a safetensors file, as stored, with absolute offsets. */
export interface SafetensorsTensor {
  readonly name: string
  /** The stored dtype name ('F32', 'F16', 'BF16'). */
  readonly storedDtype: string
  readonly dtype: DType
  /** Outermost first (row-major), as stored. */
  readonly shape: readonly number[]
  /** Absolute offset in the file, bytes. */
  readonly offsetBytes: number
  readonly byteLength: number
}

/** The header of a safetensors file. */
export interface SafetensorsHeader {
  readonly path: string
  /** Length of the JSON header, bytes (the u64 at offset 0). */
  readonly headerBytes: number
  /** Absolute offset of the data section (8 + headerBytes). */
  readonly dataOffsetBytes: number
  readonly fileBytes: number
  readonly tensors: ReadonlyMap<string, SafetensorsTensor>
  /** `__metadata__` (free-form strings), or empty. */
  readonly metadata: Readonly<Record<string, string>>
}

/** Supported stored dtypes: safetensors name → dtype and bytes per element. */
const DTYPES: ReadonlyMap<string, { dtype: DType; elementBytes: number }> = new Map([
  ['F32', { dtype: 'f32', elementBytes: 4 }],
  ['F16', { dtype: 'f16', elementBytes: 2 }],
  ['BF16', { dtype: 'bf16', elementBytes: 2 }],
])
/** Every dtype the format defines (safetensors `Dtype`), to tell an unsupported one from garbage. */
const KNOWN_DTYPES = new Set([
  'BOOL', 'U8', 'I8', 'F8_E5M2', 'F8_E4M3', 'F8_E8M0', 'F4', 'F6_E2M3', 'F6_E3M2', 'I16', 'U16', 'F16', 'BF16', 'I32',
  'U32', 'F32', 'F64', 'I64', 'U64', 'C64',
])
/** The reference implementation refuses headers above 100 MB (safetensors `MAX_HEADER_SIZE`). */
export const MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
const LENGTH_BYTES = 8

/**
 * Parses the header of the safetensors file at `path` and checks every tensor against the file: supported dtype
 * (F32, F16, BF16), a shape of whole numbers, `data_offsets` [begin, end] with begin ≤ end inside the data section, and
 * end − begin equal to shape × element size. Reads only the first 8 + N bytes.
 * Errors: ModelFormatError naming the file and, for a tensor, its name and absolute offset: missing/unreadable file,
 * a file shorter than 8 bytes, a header length of 0, above 100 MB or past the end of the file, a header that is not
 * a JSON object (the format's "magic" is the `{` that starts it), an unsupported or unknown dtype, a bad shape, offsets
 * outside the file (truncated), a size that does not match the shape.
 * Source: huggingface/safetensors README ("Format") and safetensors/src/tensor.rs (`validate`).
 */
export function readSafetensorsHeader(path: string): SafetensorsHeader {
  return withModelFile(path, ({ fd, sizeBytes }) => {
    const fail = (detail: string): never => {
      throw new ModelFormatError(path, detail)
    }
    if (sizeBytes < LENGTH_BYTES) {
      fail(`file is ${sizeBytes} bytes, a safetensors file starts with an 8-byte header length`)
    }
    const lengthBuf = new Uint8Array(LENGTH_BYTES)
    readFully(fd, lengthBuf, LENGTH_BYTES, 0)
    const length = new DataView(lengthBuf.buffer).getBigUint64(0, true)
    if (length === 0n || length > BigInt(MAX_SAFETENSORS_HEADER_BYTES)) {
      fail(
        `safetensors header length at offset 0 is ${length} bytes, expected 1..${MAX_SAFETENSORS_HEADER_BYTES}: ` +
          `not a safetensors file (first bytes ${hexBytes(lengthBuf)})`,
      )
    }
    const headerBytes = Number(length)
    if (LENGTH_BYTES + headerBytes > sizeBytes) {
      fail(
        `safetensors header length at offset 0 is ${headerBytes} bytes, past the end of the file ` +
          `(${sizeBytes} bytes): truncated, or not a safetensors file`,
      )
    }
    const raw = new Uint8Array(headerBytes)
    readFully(fd, raw, headerBytes, LENGTH_BYTES)
    if (raw[0] !== 0x7b) {
      fail(`safetensors header at offset ${LENGTH_BYTES} starts with bytes ${hexBytes(raw.subarray(0, 4))}, expected a JSON object ('{')`)
    }
    let json: unknown
    try {
      json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(raw))
    } catch (err) {
      fail(`safetensors header (${headerBytes} bytes at offset ${LENGTH_BYTES}) is not valid JSON: ${(err as Error).message}`)
    }
    if (typeof json !== 'object' || json === null || Array.isArray(json)) {
      fail(`safetensors header at offset ${LENGTH_BYTES} is not a JSON object`)
    }
    const dataOffsetBytes = LENGTH_BYTES + headerBytes
    const dataBytes = sizeBytes - dataOffsetBytes
    const tensors = new Map<string, SafetensorsTensor>()
    let metadata: Record<string, string> = {}
    for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
      if (name === '__metadata__') {
        if (typeof value === 'object' && value !== null) metadata = value as Record<string, string>
        continue
      }
      const info = value as { dtype?: unknown; shape?: unknown; data_offsets?: unknown } | null
      if (typeof info !== 'object' || info === null) fail(`tensor ${name}: header entry is not an object`)
      const offsets = info!.data_offsets
      const [begin, end] = Array.isArray(offsets) ? (offsets as unknown[]) : []
      if (
        !Array.isArray(offsets) ||
        offsets.length !== 2 ||
        !Number.isSafeInteger(begin) ||
        !Number.isSafeInteger(end) ||
        (begin as number) < 0 ||
        (end as number) < (begin as number)
      ) {
        fail(`tensor ${name}: data_offsets is ${JSON.stringify(offsets)}, expected [begin, end] with 0 <= begin <= end`)
      }
      const offsetBytes = dataOffsetBytes + (begin as number)
      const byteLength = (end as number) - (begin as number)
      const where = `tensor ${name} (data_offsets [${begin}, ${end}], ${byteLength} bytes at offset ${offsetBytes})`
      const stored = info!.dtype
      const dt = typeof stored === 'string' ? DTYPES.get(stored) : undefined
      if (dt === undefined) {
        const known = typeof stored === 'string' && KNOWN_DTYPES.has(stored)
        fail(
          `${where} has ${known ? '' : 'unknown '}dtype ${JSON.stringify(stored)}, supported: ${[...DTYPES.keys()].join(', ')}`,
        )
      }
      const shape = info!.shape
      if (!Array.isArray(shape) || shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
        fail(`${where}: shape is ${JSON.stringify(shape)}, expected an array of whole numbers`)
      }
      const dims = shape as number[]
      const need = dims.reduce((a, b) => a * b, 1) * dt!.elementBytes
      if ((end as number) > dataBytes) {
        fail(
          `${where} ends at byte ${offsetBytes + byteLength}, past the end of the file (${sizeBytes} bytes): ` +
            'the file is truncated',
        )
      }
      if (need !== byteLength) {
        fail(`${where}: its shape [${dims.join(', ')}] of ${stored as string} needs ${need} bytes, data_offsets give ${byteLength}`)
      }
      tensors.set(name, { name, storedDtype: stored as string, dtype: dt!.dtype, shape: dims, offsetBytes, byteLength })
    }
    return { path, headerBytes, dataOffsetBytes, fileBytes: sizeBytes, tensors, metadata }
  })
}

function hexBytes(bytes: Uint8Array): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join(' ')
}
