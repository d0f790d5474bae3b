/**
 * Ranges of decoder layers: how edgeshard writes them for people (inclusive, with an en dash: `layers 0–3`,
 * `layer 4`, whatever the data holds, `{ start, count }`, i.e. [start, start + count); one notation in every message
 * and every line the CLI prints), and how a peer alone in its stage groups its layers into whole-layer graphs (the
 * runner builds them, the cost model counts them).
 */

/**
 * `layers 0–3` for { start: 0, count: 4 }, `layer 4` for { start: 4, count: 1 }, `no layers` for a count of 0.
 * @example
 * formatLayers(2, 3) // 'layers 2–4'
 */
export function formatLayers(start: number, count: number): string {
  if (count <= 0) return 'no layers'
  return count === 1 ? `layer ${start}` : `layers ${start}–${start + count - 1}`
}

/**
 * Most weight bytes baked into one whole-layer graph (see `buildDecoderLayers`; a layer larger than this gets a graph
 * of its own). Each session run costs more than its kernels: on TinyLlama-1.1B Q4_0 (22 layers, 2 threads) decode took
 * 30.0, 29.4, 27.8 and 27.0 ms/token with graphs of 1, 4, 8 and 22 layers, 36.5 with per-block graphs (bench:layouts,
 * medians of 58 steps, load average 1), so graphs are as large as allowed. A graph is one protobuf, limited to 2 GiB,
 * and building it holds its weights about three times over (stacked Q/K/V and W1/W3, the protobuf, onnxruntime's copy)
 * until its session exists; a device short of memory for that sets `layersPerGraph`.
 */
export const MAX_GRAPH_WEIGHT_BYTES = 2 ** 30

/**
 * Sizes of consecutive groups of layers whose weights are `layerBytes` (in order): as few groups as `maxLayers` per
 * group and `maxBytes` per group allow, of near-equal layer counts (a single layer over `maxBytes` is a group alone).
 * @example layerGroupSizes(Array(22).fill(27e6), 8, 2 ** 30) // [8, 8, 6]
 */
export function layerGroupSizes(layerBytes: readonly number[], maxLayers: number, maxBytes: number): number[] {
  const total = layerBytes.reduce((a, b) => a + b, 0)
  const n = Math.max(1, Math.ceil(layerBytes.length / maxLayers), Math.ceil(total / maxBytes))
  const target = Math.ceil(layerBytes.length / n)
  const sizes: number[] = []
  let count = 0
  let bytes = 0
  for (const b of layerBytes) {
    if (count > 0 && (count === target || bytes + b > maxBytes)) {
      sizes.push(count)
      count = 0
      bytes = 0
    }
    count++
    bytes += b
  }
  if (count > 0) sizes.push(count)
  return sizes
}
