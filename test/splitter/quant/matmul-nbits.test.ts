/**
 * ggml Q4_0 / Q8_0 blocks re-laid out for MatMulNBits (splitter/quant/matmul-nbits.ts), checked byte by byte against
 * the layouts' definitions on arbitrary bytes (every scale bit pattern, including NaN, infinities and subnormals),
 * from an unaligned view too.
 */
import { describe, expect, it } from 'vitest'
import { ggmlToNBits } from '../../../splitter/index.ts'
import { seededRandom } from '../../support/random.ts'

/** What the layouts say (module comment): one weight at a time, the scale decoded from its f16 bits. */
function byDefinition(dtype: 'q4_0' | 'q8_0', bytes: Uint8Array, nBlocks: number): { blob: Uint8Array; scales: Float32Array } {
  const blockBytes = dtype === 'q4_0' ? 18 : 34
  const blobBytes = dtype === 'q4_0' ? 16 : 32
  const blob = new Uint8Array(nBlocks * blobBytes)
  const scales = new Float32Array(nBlocks)
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  for (let b = 0; b < nBlocks; b++) {
    const src = b * blockBytes
    scales[b] = view.getFloat16(src, true)
    if (dtype === 'q8_0') {
      for (let j = 0; j < 32; j++) blob[b * 32 + j] = (bytes[src + 2 + j]! + 128) & 0xff
      continue
    }
    // ggml: weight w < 16 is the low nibble of byte w, w ≥ 16 the high nibble of byte w − 16.
    const q = (w: number): number => (w < 16 ? bytes[src + 2 + w]! & 0x0f : bytes[src + 2 + w - 16]! >> 4)
    // MatMulNBits: byte j holds weight 2j (low nibble) and 2j + 1 (high nibble).
    for (let j = 0; j < 16; j++) blob[b * 16 + j] = q(2 * j) | (q(2 * j + 1) << 4)
  }
  return { blob, scales }
}

describe('ggmlToNBits', () => {
  const random = seededRandom(31)
  for (const dtype of ['q4_0', 'q8_0'] as const) {
    it(`re-lays out ${dtype} blocks as the layouts define, from any byte offset`, () => {
      const rows = 7
      const cols = 96 // 3 blocks per row
      const nBlocks = (rows * cols) / 32
      const size = nBlocks * (dtype === 'q4_0' ? 18 : 34)
      for (const offset of [0, 1, 3]) {
        const backing = new Uint8Array(size + offset)
        for (let i = 0; i < backing.length; i++) backing[i] = Math.floor(random() * 256)
        const bytes = backing.subarray(offset)
        const expected = byDefinition(dtype, bytes, nBlocks)
        const w = ggmlToNBits(dtype, bytes, rows, cols)
        expect(w).toMatchObject({ bits: dtype === 'q4_0' ? 4 : 8, rows, cols })
        expect([...w.blob]).toEqual([...expected.blob])
        expect([...w.scales]).toEqual([...expected.scales]) // toEqual treats NaN as equal to NaN
      }
    })
  }

  it('decodes every f16 scale bit pattern as DataView.getFloat16 does', () => {
    const bytes = new Uint8Array(65536 * 18)
    const view = new DataView(bytes.buffer)
    for (let i = 0; i < 65536; i++) view.setUint16(i * 18, i, true)
    const w = ggmlToNBits('q4_0', bytes, 65536, 32)
    for (let i = 0; i < 65536; i++) expect(Object.is(w.scales[i], Math.fround(view.getFloat16(i * 18, true))) || (Number.isNaN(w.scales[i]) && Number.isNaN(view.getFloat16(i * 18, true)))).toBe(true)
  })
})
