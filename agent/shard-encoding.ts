import { readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { logger } from '@libp2p/logger'
import type { LayerShardWeights, LinearWeight, TensorParallelPlan } from '../splitter/index.ts'
import { VECTOR_NAMES, WEIGHT_NAMES, type WeightName } from './protocol.ts'

const log = logger('edgeshard:agent:shards')

/** One weight of a layer shard as sent in a `tensor` frame (layout in protocol.ts). */
export interface EncodedTensor {
  readonly name: WeightName
  readonly bits: 32 | 8 | 4
  readonly rows: number
  readonly cols: number
  readonly body: Uint8Array
}

function bytesOf(t: Float32Array): Uint8Array {
  return new Uint8Array(t.buffer, t.byteOffset, t.byteLength)
}

/**
 * A layer shard's weights in protocol order (attention block, then FFN block), as frame bodies: f32 values as they
 * are (no copy); quantized weights as blob followed by scales (one copy).
 */
export function encodeLayerShard(w: LayerShardWeights): EncodedTensor[] {
  const a = w.attention
  const byName: Partial<Record<WeightName, LinearWeight | Float32Array>> = {
    ...(a ? { attn_norm: a.attn_norm, wq: a.wq, wk: a.wk, wv: a.wv, wo: a.wo, ...(a.bias ?? {}) } : {}),
    ...(w.ffn ?? {}),
  }
  const out: EncodedTensor[] = []
  for (const name of WEIGHT_NAMES) {
    const t = byName[name]
    if (!t) continue
    if (t instanceof Float32Array) {
      if (!VECTOR_NAMES.has(name)) throw new RangeError(`weight ${name} is a vector, expected a matrix`)
      out.push({ name, bits: 32, rows: 1, cols: t.length, body: bytesOf(t) })
    } else if (t.bits === 32) {
      out.push({ name, bits: 32, rows: t.rows, cols: t.cols, body: bytesOf(t.data) })
    } else {
      const body = new Uint8Array(t.blob.byteLength + t.scales.byteLength)
      body.set(t.blob, 0)
      body.set(bytesOf(t.scales), t.blob.byteLength)
      out.push({ name, bits: t.bits, rows: t.rows, cols: t.cols, body })
    }
  }
  return out
}

/** A copy of a layer shard that owns its buffers (slices are views that would keep whole model tensors alive). */
export function ownedLayerShard(w: LayerShardWeights): LayerShardWeights {
  const lin = (t: LinearWeight): LinearWeight =>
    t.bits === 32 ? { ...t, data: t.data.slice() } : { ...t, blob: t.blob.slice(), scales: t.scales.slice() }
  const a = w.attention
  return {
    attention: a
      ? {
          attn_norm: a.attn_norm.slice(),
          wq: lin(a.wq),
          wk: lin(a.wk),
          wv: lin(a.wv),
          wo: lin(a.wo),
          bias: a.bias ? { bq: a.bias.bq.slice(), bk: a.bias.bk.slice(), bv: a.bias.bv.slice() } : null,
        }
      : null,
    ffn: w.ffn ? { ffn_norm: w.ffn.ffn_norm.slice(), w1: lin(w.ffn.w1), w3: lin(w.ffn.w3), w2: lin(w.ffn.w2) } : null,
  }
}

/**
 * KV cache bytes of a shard at the plan's full context: per layer K and V [kvHeads, maxSeqLen, headDim] f32, plus
 * one layer's worth for the copy made while appending.
 */
export function kvCacheBytes(plan: TensorParallelPlan, shardIndex: number): number {
  const m = plan.model
  const perLayer = 2 * plan.shards[shardIndex]!.kvHeads.count * m.headDim * m.maxSeqLen * 4
  return perLayer * (plan.layers.count + 1)
}

/**
 * Default directory for a peer's shard files (sliding-window mode): `<tmp>/edgeshard-shards/<label>-<pid>`, removed by
 * its owner when the session ends. On first use, the directories of processes no longer running (killed before they
 * could clean up) are removed.
 */
export function defaultShardDir(label: string): string {
  const root = join(tmpdir(), 'edgeshard-shards')
  if (!swept) {
    swept = true
    removeStaleShardDirs(root)
  }
  return join(root, `${label}-${process.pid}`)
}

let swept = false

/** Removes `<label>-<pid>` directories under `root` whose pid is not a running process. */
function removeStaleShardDirs(root: string): void {
  let names: string[]
  try {
    names = readdirSync(root)
  } catch {
    return // none yet
  }
  for (const name of names) {
    const pid = Number(/^[a-z]+-(\d+)$/.exec(name)?.[1])
    if (!pid || pid === process.pid || isRunning(pid)) continue
    rmSync(join(root, name), { recursive: true, force: true })
    log('removed the shard files of process %d, no longer running', pid)
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM' // alive, another user's
  }
}
