import type { Allreduce, AllreduceOptions } from '../transport/index.ts'

/** Several shards run by one peer that take one seat in an allreduce (see {@link localAllreduceGroup}). */
export interface LocalAllreduceGroup {
  /** One allreduce per local shard, in shard order. */
  readonly members: readonly Allreduce[]
  /** Rejects every round waiting for the others with `err` (one shard failed: the others must not wait forever). */
  fail(err: Error): void
}

interface Round {
  readonly partials: (Float32Array | null | undefined)[] // per local shard: [n] f32, null = no contribution
  arrived: number
  readonly waiters: ({ resolve: (sum: Float32Array) => void; reject: (err: unknown) => void } | undefined)[]
}

/**
 * `n` shards on one peer (the master after it took over a lost worker's shard) sharing that peer's seat in `outer`:
 * each shard calls `allreduce(tag, partial)` as usual; once all `n` have, their partials are summed in shard order
 * (f32 additions; nulls skipped) and the sum is this peer's one contribution to `outer`, whose result every shard gets
 * (the first the array `outer` returned, the others copies).
 * @throws RangeError when `n` is not a positive integer
 */
export function localAllreduceGroup(n: number, outer: Allreduce): LocalAllreduceGroup {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`cannot group ${n} local shards in one allreduce seat`)
  const rounds = new Map<number, Round>()
  let failure: Error | undefined
  const complete = (tag: number, round: Round, opts: AllreduceOptions | undefined): void => {
    rounds.delete(tag)
    let sum: Float32Array | null = null
    for (const p of round.partials) {
      if (!p) continue
      if (sum === null) sum = p.slice()
      else if (p.length !== sum.length) {
        for (const w of round.waiters) w?.reject(new RangeError(`allreduce tag ${tag}: local shards sent ${sum.length} and ${p.length} values`))
        return
      } else for (let k = 0; k < sum.length; k++) sum[k]! += p[k]!
    }
    outer.allreduce(tag, sum, opts).then(
      (result) => {
        for (const [i, w] of round.waiters.entries()) w?.resolve(i === 0 ? result : result.slice())
      },
      (err: unknown) => {
        for (const w of round.waiters) w?.reject(err)
      },
    )
  }
  const members = Array.from({ length: n }, (_, i): Allreduce => ({
    allreduce(tag, partial, opts) {
      if (failure) return Promise.reject(failure)
      let round = rounds.get(tag)
      if (!round) {
        round = { partials: new Array(n).fill(undefined), arrived: 0, waiters: new Array(n).fill(undefined) }
        rounds.set(tag, round)
      }
      const r = round
      if (r.waiters[i]) return Promise.reject(new RangeError(`local shard ${i} already waits for allreduce tag ${tag}`))
      return new Promise<Float32Array>((resolve, reject) => {
        r.partials[i] = partial
        r.waiters[i] = { resolve, reject }
        r.arrived++
        if (r.arrived === n) complete(tag, r, opts)
      })
    },
  }))
  return {
    members,
    fail(err) {
      failure ??= err
      for (const round of rounds.values()) for (const w of round.waiters) w?.reject(err)
      rounds.clear()
    },
  }
}
