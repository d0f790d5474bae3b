/**
 * Flag value parsers shared by the commands (commander `argParser`s): each throws InvalidArgumentError naming the
 * value, which commander prints with the usage.
 */
import { InvalidArgumentError } from 'commander'

/** A whole number ≥ `min`. */
export function wholeNumber(min: number) {
  return (value: string): number => {
    const n = Number(value)
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`expected a whole number ≥ ${min}, got ${JSON.stringify(value)}`)
    return n
  }
}

/** Any finite number. */
export function finiteNumber(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`expected a number, got ${JSON.stringify(value)}`)
  return n
}

const BYTE_UNITS: Readonly<Record<string, number>> = { '': 1, K: 1e3, M: 1e6, G: 1e9, T: 1e12, Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40 }

/** Parses `512MB`, `2GiB`, `300000000` into bytes (k/M/G/T decimal, Ki/Mi/Gi/Ti binary, `B` optional). */
export function byteSize(value: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?)?B?\s*$/.exec(value)
  const scale = match ? BYTE_UNITS[(match[2] ?? '').replace('k', 'K')] : undefined
  if (!match || scale === undefined) throw new InvalidArgumentError(`expected a size like 512MB or 2GiB, got ${JSON.stringify(value)}`)
  return Math.floor(Number(match[1]) * scale)
}

/** Accumulates a repeatable, comma-separated flag (`--x a,b --x c` → ['a', 'b', 'c']). */
export function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), ...value.split(',').map((v) => v.trim()).filter((v) => v.length > 0)]
}
