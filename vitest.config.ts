import { defineConfig } from 'vitest/config'

// onnxruntime-node is a native addon: only the `forks` pool runs it safely.
export default defineConfig({
  test: {
    pool: 'forks',
    include: ['test/**/*.test.ts'],
    exclude: ['test/scale/**', 'node_modules/**'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
})
