/**
 * ONNX external data (onnx/docs/ExternalData.md): a `TensorProto` with `data_location = EXTERNAL` keeps its bytes in a
 * file beside the model, named by the `location` entry of `external_data`, at `offset` for `length` bytes. Cut heads
 * and tails keep these references, so they load with the same files (onnxruntime's `externalData` session option
 * maps each location to bytes in memory).
 */
import onnxProto from 'onnx-proto'
import type { OnnxGraph, OnnxModel } from './onnx-graph.ts'
import { encodeModel, withGraph } from './onnx-graph.ts'

const { onnx } = onnxProto

type OnnxTensor = onnxProto.onnx.ITensorProto

function tensorsOf(graph: OnnxGraph, out: OnnxTensor[]): void {
  for (const t of graph.initializer ?? []) out.push(t)
  for (const s of graph.sparseInitializer ?? []) {
    if (s.values) out.push(s.values)
    if (s.indices) out.push(s.indices)
  }
  for (const node of graph.node ?? []) {
    for (const attr of node.attribute ?? []) {
      if (attr.t) out.push(attr.t)
      for (const t of attr.tensors ?? []) out.push(t)
      if (attr.g) tensorsOf(attr.g, out)
      for (const g of attr.graphs ?? []) tensorsOf(g, out)
    }
  }
}

function isExternal(t: OnnxTensor): boolean {
  return t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL
}

/** The distinct `location`s of external data the model's tensors reference (relative to the model's folder). */
export function externalDataLocations(model: OnnxModel): string[] {
  const tensors: OnnxTensor[] = []
  if (model.graph) tensorsOf(model.graph, tensors)
  const locations = new Set<string>()
  for (const t of tensors) {
    if (!isExternal(t)) continue
    const location = (t.externalData ?? []).find((e) => e.key === 'location')?.value
    if (location) locations.add(location)
  }
  return [...locations]
}

/**
 * Moves every initializer of at least `minBytes` raw bytes into one external data file `location` (offsets aligned to
 * 64 bytes, as onnx's `convert_model_to_external_data` aligns them when asked).
 * @returns the model bytes referencing `location`, and the file's bytes
 */
export function toExternalData(model: OnnxModel, location: string, minBytes = 1024): { model: Uint8Array; data: Uint8Array } {
  const graph = model.graph ?? {}
  const chunks: Uint8Array[] = []
  let offset = 0
  const initializer = (graph.initializer ?? []).map((t) => {
    const raw = t.rawData
    if (!raw || raw.byteLength < minBytes || isExternal(t)) return t
    const padding = (64 - (offset % 64)) % 64
    if (padding > 0) chunks.push(new Uint8Array(padding))
    offset += padding
    chunks.push(raw)
    const moved = onnx.TensorProto.create({
      name: t.name ?? '',
      dims: t.dims ?? [],
      dataType: t.dataType ?? 0,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: location },
        { key: 'offset', value: String(offset) },
        { key: 'length', value: String(raw.byteLength) },
      ],
    })
    offset += raw.byteLength
    return moved
  })
  const data = new Uint8Array(offset)
  let at = 0
  for (const c of chunks) {
    data.set(c, at)
    at += c.byteLength
  }
  const out = withGraph(model, onnx.GraphProto.create({ ...graph, initializer }))
  return { model: encodeModel(out), data }
}
