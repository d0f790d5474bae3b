/**
 * Block-quantized linear weights in the layout of onnxruntime's `com.microsoft.MatMulNBits` (ORT contrib op spec:
 * B uint8 [N, K/blockSize, blockSize·bits/8], scales [N·K/blockSize], no zero points → zero point 2^(bits−1)),
 * re-laid out from ggml's Q4_0 / Q8_0 blocks without re-quantizing (../shared/NOTES.md: same arithmetic).
 *
 * ggml Q4_0 block (18 bytes, 32 weights): f16 scale d, 16 bytes whose low nibbles are weights 0–15 and high nibbles
 * weights 16–31, value (q − 8)·d. MatMulNBits 4-bit blob (16 bytes): byte j holds weight 2j in its low nibble and
 * 2j+1 in its high nibble, value (q − 8)·scale.
 * ggml Q8_0 block (34 bytes): f16 scale d, 32 int8 q, value q·d. MatMulNBits 8-bit blob: 32 uint8 u = q + 128,
 * value (u − 128)·scale.
 */

import { Q4_0_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK as BLOCK } from './ggml-blocks.ts'

const GGML_BLOCK_BYTES = { q4_0: Q4_0_BLOCK_BYTES, q8_0: Q8_0_BLOCK_BYTES } as const

/** A linear weight [out, in] ready for MatMulNBits. */
export interface NBitsWeight {
  readonly bits: 4 | 8
  /** Output features (MatMulNBits N). */
  readonly rows: number
  /** Input features (MatMulNBits K), a multiple of 32. */
  readonly cols: number
  /** [rows, cols/32, 32·bits/8] uint8 */
  readonly blob: Uint8Array
  /** [rows · cols/32] f32 */
  readonly scales: Float32Array
}

/**
 * Re-lays ggml blocks out for MatMulNBits.
 * @param bytes ggml blocks of a [rows, cols] tensor, row-major (rows · cols/32 blocks).
 * @throws RangeError when cols is not a multiple of 32 or the byte count does not match.
 */
export function ggmlToNBits(dtype: 'q4_0' | 'q8_0', bytes: Uint8Array, rows: number, cols: number): NBitsWeight {
  if (cols % BLOCK !== 0) throw new RangeError(`cannot lay out a ${dtype} tensor of ${cols} columns: not a multiple of ${BLOCK}`)
  const nBlocks = (rows * cols) / BLOCK
  const blockBytes = GGML_BLOCK_BYTES[dtype]
  if (bytes.byteLength !== nBlocks * blockBytes) {
    throw new RangeError(`cannot lay out ${rows}×${cols} ${dtype}: ${bytes.byteLength} bytes, expected ${nBlocks * blockBytes}`)
  }
  const bits = dtype === 'q4_0' ? 4 : 8
  const blobBytes = (BLOCK * bits) / 8
  const blob = new Uint8Array(nBlocks * blobBytes)
  const scales = new Float32Array(nBlocks)
  const f16 = halfTable()
  if (bits === 4) {
    // Four source bytes at a time (a recovery re-lays out a whole model's share of blocks: this loop is most of it).
    // Bytes b0..b3 (weights 4k..4k+3 low, 4k+16..4k+19 high) give blob bytes 2k, 2k+1 from their low nibbles and
    // 8+2k, 9+2k from their high ones: (n | n >>> 4) puts nibbles 0|1 in byte 0 and 2|3 in byte 2.
    const out = new Uint16Array(blob.buffer, blob.byteOffset, blob.byteLength / 2)
    for (let b = 0; b < nBlocks; b++) {
      const src = b * blockBytes
      scales[b] = f16[bytes[src]! | (bytes[src + 1]! << 8)]!
      const dst = b * 8 // in 16-bit words
      for (let k = 0; k < 4; k++) {
        const q = src + 2 + 4 * k
        const x = bytes[q]! | (bytes[q + 1]! << 8) | (bytes[q + 2]! << 16) | (bytes[q + 3]! << 24)
        const lo = x & 0x0f0f0f0f
        const hi = (x >>> 4) & 0x0f0f0f0f
        const l = lo | (lo >>> 4)
        const h = hi | (hi >>> 4)
        out[dst + k] = (l & 0xff) | ((l >>> 8) & 0xff00)
        out[dst + 4 + k] = (h & 0xff) | ((h >>> 8) & 0xff00)
      }
    }
  } else {
    for (let b = 0; b < nBlocks; b++) {
      const src = b * blockBytes
      scales[b] = f16[bytes[src]! | (bytes[src + 1]! << 8)]!
      const dst = b * blobBytes
      for (let j = 0; j < 32; j++) blob[dst + j] = (bytes[src + 2 + j]! ^ 0x80) & 0xff // int8 q → q + 128
    }
  }
  return { bits, rows, cols, blob, scales }
}

let HALF: Float32Array | null = null

/** Every f16 bit pattern as f32 (256 KiB, built once): faster than decoding each block's scale. */
function halfTable(): Float32Array {
  if (HALF) return HALF
  const table = new Float32Array(65536)
  const view = new DataView(new ArrayBuffer(2))
  for (let i = 0; i < 65536; i++) {
    view.setUint16(0, i, true)
    table[i] = view.getFloat16(0, true)
  }
  HALF = table
  return table
}

/**
 * Input features (columns) `[start, start+count)` of a ggml-blocked [rows, cols] tensor, re-laid out for MatMulNBits:
 * the same as `nbitsColumns(ggmlToNBits(...), start, count)` but converting only the blocks it keeps (one peer's
 * share costs its share of the work, not the whole tensor's).
 * @throws RangeError when cols, start or count is not a multiple of 32, the range is outside the tensor, or the byte
 *   count does not match.
 */
export function ggmlColumnsToNBits(dtype: 'q4_0' | 'q8_0', bytes: Uint8Array, rows: number, cols: number, start: number, count: number): NBitsWeight {
  if (cols % BLOCK !== 0 || start % BLOCK !== 0 || count % BLOCK !== 0) {
    throw new RangeError(`cannot cut columns ${start}..${start + count} of a ${dtype} tensor of ${cols} columns: not on a ${BLOCK}-column block boundary`)
  }
  if (start < 0 || start + count > cols) throw new RangeError(`cannot take columns ${start}..${start + count} of a ${cols}-column tensor`)
  const blockBytes = GGML_BLOCK_BYTES[dtype]
  const perRow = cols / BLOCK
  if (bytes.byteLength !== rows * perRow * blockBytes) {
    throw new RangeError(`cannot lay out ${rows}×${cols} ${dtype}: ${bytes.byteLength} bytes, expected ${rows * perRow * blockBytes}`)
  }
  const b0 = start / BLOCK
  const nb = count / BLOCK
  const kept = new Uint8Array(rows * nb * blockBytes) // ggml blocks of the kept columns, row-major
  for (let r = 0; r < rows; r++) kept.set(bytes.subarray((r * perRow + b0) * blockBytes, (r * perRow + b0 + nb) * blockBytes), r * nb * blockBytes)
  return ggmlToNBits(dtype, kept, rows, count)
}

/**
 * Rows `[start, start+count)` of an NBits weight: zero-copy views.
 * @throws RangeError outside the weight.
 */
export function nbitsRows(w: NBitsWeight, start: number, count: number): NBitsWeight {
  if (start < 0 || count < 0 || start + count > w.rows) throw new RangeError(`cannot take rows ${start}..${start + count} of a ${w.rows}-row weight`)
  const blocksPerRow = w.cols / BLOCK
  const blobRow = (blocksPerRow * BLOCK * w.bits) / 8
  return {
    bits: w.bits,
    rows: count,
    cols: w.cols,
    blob: w.blob.subarray(start * blobRow, (start + count) * blobRow),
    scales: w.scales.subarray(start * blocksPerRow, (start + count) * blocksPerRow),
  }
}

/**
 * Columns `[start, start+count)` of an NBits weight, copied; a cut must fall on block boundaries.
 * @throws RangeError naming the columns when start or count is not a multiple of 32, or outside the weight.
 */
export function nbitsColumns(w: NBitsWeight, start: number, count: number): NBitsWeight {
  if (start % BLOCK !== 0 || count % BLOCK !== 0) {
    throw new RangeError(`cannot cut columns ${start}..${start + count} of a ${w.bits}-bit weight: not on a ${BLOCK}-column block boundary`)
  }
  if (start < 0 || start + count > w.cols) throw new RangeError(`cannot take columns ${start}..${start + count} of a ${w.cols}-column weight`)
  const blocksPerRow = w.cols / BLOCK
  const blobBlock = (BLOCK * w.bits) / 8
  const b0 = start / BLOCK
  const nb = count / BLOCK
  const blob = new Uint8Array(w.rows * nb * blobBlock)
  const scales = new Float32Array(w.rows * nb)
  for (let r = 0; r < w.rows; r++) {
    blob.set(w.blob.subarray((r * blocksPerRow + b0) * blobBlock, (r * blocksPerRow + b0 + nb) * blobBlock), r * nb * blobBlock)
    scales.set(w.scales.subarray(r * blocksPerRow + b0, r * blocksPerRow + b0 + nb), r * nb)
  }
  return { bits: w.bits, rows: w.rows, cols: count, blob, scales }
}

/** Row `row` of an NBits weight dequantized to f32 [cols] (the master's embedding lookup). */
export function nbitsRowF32(w: NBitsWeight, row: number, out: Float32Array = new Float32Array(w.cols)): Float32Array {
  const blocksPerRow = w.cols / BLOCK
  const blobBlock = (BLOCK * w.bits) / 8
  for (let b = 0; b < blocksPerRow; b++) {
    const d = w.scales[row * blocksPerRow + b]!
    const src = (row * blocksPerRow + b) * blobBlock
    for (let j = 0; j < BLOCK; j++) {
      const q = w.bits === 4 ? (j % 2 === 0 ? w.blob[src + (j >> 1)]! & 0x0f : w.blob[src + (j >> 1)]! >> 4) - 8 : w.blob[src + j]! - 128
      out[b * BLOCK + j] = q * d
    }
  }
  return out
}
