/** Test helper: asserts that `fn` throws a typed one-line format error naming `path` and each of `parts`. */
import { expect } from 'vitest'

export function expectFormatError(
  fn: () => unknown,
  name: 'ModelFormatError' | 'TokenizerFormatError',
  path: string,
  ...parts: string[]
): Error & { path: string } {
  let caught: unknown
  try {
    fn()
  } catch (err) {
    caught = err
  }
  expect(caught, 'expected an error to be thrown').toBeInstanceOf(Error)
  const err = caught as Error & { path: string }
  expect(err.name).toBe(name)
  expect(err.path).toBe(path)
  expect(err.message).toContain(path)
  expect(err.message).not.toMatch(/[\r\n]/)
  for (const part of parts) expect(err.message).toContain(part)
  return err
}
