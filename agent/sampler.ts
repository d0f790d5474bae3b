/** Sampling settings of a generation. */
export interface SamplerOptions {
  /** 0 = greedy (argmax); otherwise logits are divided by it before the softmax. */
  readonly temperature: number
  /** Nucleus sampling threshold in (0, 1); ≥ 1 or ≤ 0 samples from the full distribution. */
  readonly topP: number
  /** Seed of the xorshift generator (non-zero). */
  readonly seed: number
}

/**
 * Token sampler of llama2.c run.c (`Sampler`): argmax at temperature 0, else softmax with temperature and nucleus
 * (top-p) sampling, driven by run.c's xorshift64* generator so that a seed gives the same choices as run.c.
 * Runs on the master only: token ids never leave it.
 */
export class Sampler {
  readonly #options: SamplerOptions
  #state: bigint

  constructor(options: SamplerOptions) {
    if (!(options.temperature >= 0) || !Number.isFinite(options.temperature)) {
      throw new RangeError(`temperature must be a finite number ≥ 0, got ${options.temperature}`)
    }
    if (!Number.isFinite(options.topP)) throw new RangeError(`top-p must be a finite number, got ${options.topP}`)
    this.#options = options
    this.#state = BigInt.asUintN(64, BigInt(Math.trunc(options.seed)) || 1n)
  }

  /** Picks the next token from `logits` [vocab] f32 (modified in place when temperature > 0). */
  sample(logits: Float32Array): number {
    const { temperature, topP } = this.#options
    if (temperature === 0) return argmax(logits)
    for (let i = 0; i < logits.length; i++) logits[i]! /= temperature
    softmaxInPlace(logits)
    const coin = this.#randomF32()
    return topP <= 0 || topP >= 1 ? sampleMultinomial(logits, coin) : sampleTopP(logits, topP, coin)
  }

  /** run.c `random_u32`: xorshift64* (Vigna 2016), upper 32 bits. */
  #randomU32(): number {
    let s = this.#state
    s ^= s >> 12n
    s = BigInt.asUintN(64, s ^ (s << 25n))
    s ^= s >> 27n
    this.#state = s
    return Number(BigInt.asUintN(64, s * 0x2545f4914f6cdd1dn) >> 32n)
  }

  /** run.c `random_f32`: a float in [0, 1). */
  #randomF32(): number {
    return Math.fround((this.#randomU32() >>> 8) / 16777216)
  }
}

/** Index of the largest value (the first on ties, as run.c). */
export function argmax(values: Float32Array): number {
  let best = 0
  for (let i = 1; i < values.length; i++) if (values[i]! > values[best]!) best = i
  return best
}

function softmaxInPlace(x: Float32Array): void {
  let max = Number.NEGATIVE_INFINITY
  for (const v of x) if (v > max) max = v
  let sum = 0
  for (let i = 0; i < x.length; i++) {
    x[i] = Math.exp(x[i]! - max)
    sum += x[i]!
  }
  for (let i = 0; i < x.length; i++) x[i]! /= sum
}

function sampleMultinomial(probs: Float32Array, coin: number): number {
  let cdf = 0
  for (let i = 0; i < probs.length; i++) {
    cdf += probs[i]!
    if (coin < cdf) return i
  }
  return probs.length - 1
}

/** run.c `sample_topp`: smallest set of tokens whose probability exceeds topP, sampled by `coin`. */
function sampleTopP(probs: Float32Array, topP: number, coin: number): number {
  const cutoff = (1 - topP) / (probs.length - 1)
  const candidates: { i: number; p: number }[] = []
  for (let i = 0; i < probs.length; i++) if (probs[i]! >= cutoff) candidates.push({ i, p: probs[i]! })
  candidates.sort((a, b) => b.p - a.p)
  let cumulative = 0
  let last = candidates.length - 1
  for (let k = 0; k < candidates.length; k++) {
    cumulative += candidates[k]!.p
    if (cumulative > topP) {
      last = k
      break
    }
  }
  const r = coin * cumulative
  let cdf = 0
  for (let k = 0; k <= last; k++) {
    cdf += candidates[k]!.p
    if (r < cdf) return candidates[k]!.i
  }
  return candidates[last]!.i
}
