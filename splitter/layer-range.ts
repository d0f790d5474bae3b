/**
 * How edgeshard writes a range of decoder layers for people: inclusive, with an en dash (`layers 0–3`, `layer 4`),
 * whatever the data holds (`{ start, count }`, i.e. [start, start + count)). One notation in every message and every
 * line the CLI prints (plans, emulate, run summaries, errors).
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
