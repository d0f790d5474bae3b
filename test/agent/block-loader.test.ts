import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { crc32 } from 'node:zlib'
import { afterAll, describe, expect, it } from 'vitest'
import { BlockLoader } from '../../agent/block-loader.ts'

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-loader-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('BlockLoader (the sliding window’s loader thread)', () => {
  const path = join(dir, 'blocks.bin')
  const file = Uint8Array.from({ length: 3 * 4096 + 100 }, (_, i) => (i * 31 + 7) & 0xff)
  writeFileSync(path, file)

  it('reads blocks into shared slots with their CRC-32, in order, and reports a short read at the end', async () => {
    const loader = await BlockLoader.start(path, 2, 8192)
    try {
      const [a, b] = await Promise.all([loader.load(0, 0, 4096, true), loader.load(1, 4096, 8192, true)])
      expect(a).toEqual({ bytesRead: 4096, crc: crc32(file.subarray(0, 4096)) })
      expect(b).toEqual({ bytesRead: 8192, crc: crc32(file.subarray(4096, 12288)) })
      expect(new Uint8Array(loader.slots[0]!, 0, 4096)).toEqual(file.subarray(0, 4096))
      expect(new Uint8Array(loader.slots[1]!, 0, 8192)).toEqual(file.subarray(4096, 12288))
      // Past the end of the file: fewer bytes than asked; no checksum when not asked.
      expect(await loader.load(0, 12288, 4096, false)).toEqual({ bytesRead: 100, crc: null })
      await expect(loader.load(2, 0, 10, false)).rejects.toThrow(RangeError)
      await expect(loader.load(0, 0, 8193, false)).rejects.toThrow(/cannot load 8193 bytes into slot 0/)
    } finally {
      await loader.close()
    }
    await expect(loader.load(0, 0, 10, false)).rejects.toThrow(/is closed/)
  })

  it('names the file when the thread cannot open it', async () => {
    await expect(BlockLoader.start(join(dir, 'missing.bin'), 1, 64)).rejects.toThrow(/cannot open .*missing\.bin: ENOENT/)
  })
})
