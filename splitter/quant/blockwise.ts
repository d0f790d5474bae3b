/**
 * Block-quantized linear weights in the layout a streamed (graph-input) weight is applied from.
 *
 * onnxruntime 1.30's `MatMulNBits` is fast only with a constant B, which it pre-packs when the session is created;
 * fed as a graph input it takes a reference path ~600× slower (a TinyLlama-size FFN block: 0.8 ms baked, ~550 ms as
 * inputs), and creating a session per streamed block costs ~25 ms per 21 MB. A sliding window of weights therefore
 * needs a kernel that reads B as it comes: the integer GEMM of `MatMulInteger`, batched over the K/32 blocks so that
 * each block keeps its own scale. B is stored block-major and transposed:
 *
 * - `values` uint8 [in/32, 32, out]: the quantized value of weight (out o, in 32·b + j) at [b, j, o], unsigned with
 *   zero point 8 (4-bit) or 128 (8-bit), one byte per weight;
 * - `scales` f32 [in/32, out]: the block scales.
 *
 * value(o, i) = (values[i/32, i%32, o] − zeroPoint) · scales[i/32, o], the same arithmetic as MatMulNBits and ggml's
 * Q4_0 / Q8_0 (a re-layout, not a re-quantization). A 4-bit weight takes 2× its packed bytes (one byte per value: the
 * kernel cannot unpack nibbles without extra passes over B that cost more than the bytes they save).
 */

import type { NBitsWeight } from './matmul-nbits.ts'

const BLOCK = 32

/** A linear weight [out, in] in the blockwise streamed layout (see the module doc). */
export interface BlockwiseWeight {
  readonly bits: 4 | 8
  readonly layout: 'blockwise'
  /** Output features. */
  readonly rows: number
  /** Input features, a multiple of 32. */
  readonly cols: number
  /** [cols/32, 32, rows] uint8, zero point 2^(bits−1) */
  readonly values: Uint8Array
  /** [cols/32, rows] f32 */
  readonly scales: Float32Array
}

/** Zero point of an unsigned `bits`-bit value (MatMulNBits' default, 2^(bits−1)). */
export function blockwiseZeroPoint(bits: 4 | 8): number {
  return bits === 4 ? 8 : 128
}

/** Bytes of a [rows, cols] weight in the blockwise layout: one per value plus an f32 scale per 32. */
export function blockwiseBytes(rows: number, cols: number): number {
  return rows * cols + (rows * cols * 4) / BLOCK
}

/**
 * Re-lays an NBits weight out block-major for streaming (see the module doc). `out` may be given to reuse a buffer of
 * {@link blockwiseBytes}: values first, then the scales.
 * @throws RangeError when `out` is smaller than the weight needs.
 */
export function nbitsToBlockwise(w: NBitsWeight, out?: Uint8Array): BlockwiseWeight {
  const { rows, cols, bits } = w
  const blocks = cols / BLOCK
  const bytes = blockwiseBytes(rows, cols)
  const buffer = out ?? new Uint8Array(bytes)
  if (buffer.byteLength < bytes || buffer.byteOffset % 4 !== 0) {
    throw new RangeError(`cannot lay out a ${rows}×${cols} weight blockwise in ${buffer.byteLength} bytes: needs ${bytes}, 4-byte aligned`)
  }
  const values = buffer.subarray(0, rows * cols) // [blocks, 32, rows]
  const scales = new Float32Array(buffer.buffer, buffer.byteOffset + rows * cols, rows * blocks) // [blocks, rows]
  const blobBlock = (BLOCK * bits) / 8
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < blocks; b++) {
      const src = (r * blocks + b) * blobBlock
      scales[b * rows + r] = w.scales[r * blocks + b]!
      const dst = b * BLOCK * rows + r
      if (bits === 4) {
        for (let j = 0; j < BLOCK / 2; j++) {
          const byte = w.blob[src + j]!
          values[dst + 2 * j * rows] = byte & 0x0f
          values[dst + (2 * j + 1) * rows] = byte >> 4
        }
      } else {
        for (let j = 0; j < BLOCK; j++) values[dst + j * rows] = w.blob[src + j]!
      }
    }
  }
  return { bits, layout: 'blockwise', rows, cols, values, scales }
}

/** Views a buffer written by {@link nbitsToBlockwise} (values, then scales) as a weight; no copy. */
export function blockwiseView(bits: 4 | 8, rows: number, cols: number, bytes: Uint8Array): BlockwiseWeight {
  if (bytes.byteLength < blockwiseBytes(rows, cols) || bytes.byteOffset % 4 !== 0) {
    throw new RangeError(`cannot view ${bytes.byteLength} bytes as a blockwise ${rows}×${cols} weight: needs ${blockwiseBytes(rows, cols)}, 4-byte aligned`)
  }
  return {
    bits,
    layout: 'blockwise',
    rows,
    cols,
    values: bytes.subarray(0, rows * cols),
    scales: new Float32Array(bytes.buffer, bytes.byteOffset + rows * cols, (rows * cols) / BLOCK),
  }
}
