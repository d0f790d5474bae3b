/** What a worker accepts for one plan (agent/shard-intake.ts): the checks by field, with the messages users see. */
import { describe, expect, it } from 'vitest'
import { checkAllreduceFrame, checkForwardFrame, ShardIntake } from '../../agent/shard-intake.ts'
import { type LlamaConfig, planTensorParallel, type TensorParallelPlan } from '../../splitter/index.ts'

// stories260K's shape: dim 64, 8 heads over 4 KV heads of 8, FFN 172, 5 layers, context 512
const config: LlamaConfig = { arch: 'llama', dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, headDim: 8, vocabSize: 512, maxSeqLen: 512, normEps: 1e-5, ropeTheta: 10000, ropeStyle: 'adjacent' }
const plan = planTensorParallel(config, 2)

function errorOf(fn: () => unknown): Error {
  try {
    fn()
  } catch (err) {
    return err as Error
  }
  throw new Error('expected an error')
}

const tensor = (fields: Partial<{ layer: number; name: string; bits: 32 | 8 | 4; rows: number; cols: number }>) =>
  ({ type: 'tensor', layer: 0, name: 'wq', bits: 32, rows: 32, cols: 64, ...fields }) as Parameters<ShardIntake['tensor']>[0]

describe('ShardIntake', () => {
  it('accepts the plan and exactly the tensors it gives shard 1, each once, then load-done with their count', () => {
    const intake = new ShardIntake(plan, 1)
    // shard 1: KV heads 2..3 (query heads 4..7: 32 rows), FFN columns 86..171
    expect(intake.expectedTensors).toBe(9 * 5)
    const shapes: [string, number, number][] = [
      ['attn_norm', 1, 64], ['wq', 32, 64], ['wk', 16, 64], ['wv', 16, 64], ['wo', 64, 32],
      ['ffn_norm', 1, 64], ['w1', 86, 64], ['w3', 86, 64], ['w2', 64, 86],
    ]
    for (let layer = 0; layer < 5; layer++) {
      for (const [name, rows, cols] of shapes) intake.tensor(tensor({ layer, name, rows, cols }), rows * cols * 4)
    }
    intake.loadDone(45)
  })

  it('names the field of a plan that does not hold together', () => {
    type Mutable = { model: Record<string, unknown>; shards: { kvHeads: { count: number }; heads: { count: number } }[] }
    const bad = (change: (p: Mutable) => void): string => {
      const copy = structuredClone(plan) as unknown as Mutable
      change(copy)
      return errorOf(() => new ShardIntake(copy as unknown as TensorParallelPlan, 1)).message
    }
    expect(bad((p) => (p.model.nLayers = 1e9))).toBe('frame plan: model.nLayers must be an integer in [1, 4096], got 1000000000')
    expect(bad((p) => (p.model.dim = 'x'))).toBe('frame plan: model.dim must be an integer in [1, 65536], got "x"')
    expect(bad((p) => (p.model.nKvHeads = 3))).toBe('frame plan: model.nHeads 8 is not a multiple of model.nKvHeads 3')
    expect(bad((p) => (p.model.ropeStyle = 'spiral'))).toBe('frame plan: model.ropeStyle must be adjacent or halves, got "spiral"')
    expect(bad((p) => (p.shards[1]!.kvHeads.count = 9))).toBe('frame plan: shards[1].kvHeads.count must be an integer in [0, 2], got 9')
    expect(bad((p) => (p.shards[1]!.heads.count = 3))).toBe('frame plan: shards[1] query heads 4+3 do not match its KV heads 2+2 (× 2)')
    expect(
      bad((p) => {
        p.model.maxSeqLen = 1 << 22
        p.model.headDim = 4096
      }),
    ).toMatch(/^frame plan: RoPE tables for a context of 4194304 × head size 4096 need 137438953472 bytes, more than a quarter/)
    // Too little memory for the RoPE tables is the agent's budget, not a bad plan: the master exits with 2.
    const huge = structuredClone(plan) as unknown as Mutable
    huge.model.maxSeqLen = 1 << 22
    huge.model.headDim = 4096
    expect(errorOf(() => new ShardIntake(huge as unknown as TensorParallelPlan, 1, { memoryBytes: 1e9 })).name).toBe('MemoryBudgetError')
    expect(errorOf(() => new ShardIntake(plan, 1, { threads: 1e6 })).message).toBe('frame plan: threads must be at most 1024, got 1000000')
    expect(errorOf(() => new ShardIntake(plan, 1, { threads: 1e6 })).name).toBe('ProtocolError')
  })

  it('takes the wire dtype of the plan frame: absent = f32, f32 or f16; anything else is refused naming it', () => {
    expect(new ShardIntake(plan, 1).wireDtype).toBe('f32')
    expect(new ShardIntake(plan, 1, { wireDtype: 'f32' }).wireDtype).toBe('f32')
    expect(new ShardIntake(plan, 1, { wireDtype: 'f16' }).wireDtype).toBe('f16')
    for (const [value, shown] of [['bf16', '"bf16"'], ['F16', '"F16"'], [16, '16'], [null, 'null'], [{ f16: true }, '{"f16":true}']] as const) {
      const err = errorOf(() => new ShardIntake(plan, 1, { wireDtype: value }))
      expect(err.name).toBe('ProtocolError')
      expect(err.message).toBe(`frame plan: wireDtype must be f32 or f16, got ${shown}`)
    }
  })

  it('refuses a tensor outside the plan, of another shape or size, twice, or a short load-done', () => {
    const intake = new ShardIntake(plan, 1)
    const msg = (fields: Parameters<typeof tensor>[0], bytes: number): string => errorOf(() => intake.tensor(tensor(fields), bytes)).message
    expect(msg({ layer: 5 }, 32 * 64 * 4)).toBe('frame tensor: layer 5 is outside the plan\'s layers 0–4')
    expect(msg({ name: 'bq', rows: 1, cols: 32 }, 128)).toBe('frame tensor: shard 1 gets no weight bq (it gets attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2)')
    expect(msg({ rows: 64 }, 64 * 64 * 4)).toBe('frame tensor: wq of layer 0 is 64×64, the plan gives shard 1 32×64')
    expect(msg({ name: 'attn_norm', bits: 4, rows: 1, cols: 64 }, 40)).toBe('frame tensor: attn_norm is a vector, sent as f32 (bits 32), got bits 4')
    expect(msg({}, 100)).toBe('frame tensor: wq of layer 0 has a 100-byte body, 32×64 at 32 bits needs 8192')
    intake.tensor(tensor({}), 8192)
    expect(msg({}, 8192)).toBe('frame tensor: wq of layer 0 was sent twice')
    expect(errorOf(() => intake.loadDone(1)).message).toBe('frame load-done: announces 1 tensors after 1, the plan gives shard 1 45')
  })

  it('checks forward and allreduce frames against the loaded plan', () => {
    const body = (bytes: number) => ({ header: { type: 'ar', tag: 3 }, body: new Uint8Array(bytes) })
    checkAllreduceFrame(body(2 * 64 * 4), plan)
    checkAllreduceFrame({ header: { type: 'ar', tag: 3, dtype: 'f16' }, body: new Uint8Array(64 * 2) }, plan)
    expect(errorOf(() => checkAllreduceFrame(body(256), undefined)).message).toBe('frame ar: no shard is loaded, nothing to allreduce')
    expect(errorOf(() => checkAllreduceFrame(body(100), plan)).message).toBe('frame ar: a 100-byte body is not [seq, 64] f32 with 1 ≤ seq ≤ 512')
    expect(errorOf(() => checkAllreduceFrame({ header: { type: 'ar', tag: 1.5 }, body: new Uint8Array(256) }, plan)).message).toBe('frame ar: tag must be an integer ≥ 0, got 1.5')
    expect(errorOf(() => checkAllreduceFrame({ header: { type: 'ar', tag: 1, dtype: 'bf16' }, body: new Uint8Array(256) }, plan)).message).toBe('frame ar: dtype must be f32 or f16, got "bf16"')
    checkForwardFrame({ step: 0, pos0: 0, seq: 2 }, 2 * 64 * 4, plan)
    expect(errorOf(() => checkForwardFrame({ step: 0, pos0: 511, seq: 2 }, 512, plan)).message).toBe('frame forward: positions 511..512 pass the context of 512')
    expect(errorOf(() => checkForwardFrame({ step: 2 ** 52, pos0: 0, seq: 1 }, 256, plan)).message).toMatch(/^frame forward: step 4503599627370496 is over \d+ \(allreduce tags would not be exact\)$/)
    expect(errorOf(() => checkForwardFrame({ step: 0, pos0: 0, seq: 2 }, 256, plan)).message).toBe('frame forward: a 256-byte body for seq 2, expected [2, 64] f32 = 512 bytes')
  })
})
