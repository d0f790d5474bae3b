import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { defineConfig } from 'vitest/config'

// onnxruntime-node is a native addon: only the `forks` pool runs it safely.
export default defineConfig({
  test: {
    pool: 'forks',
    include: ['test/**/*.test.ts'],
    exclude: ['test/scale/**', 'node_modules/**'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Identity keys the CLI creates on first use (~/.config/edgeshard/identity.key) go to a scratch folder instead.
    env: { XDG_CONFIG_HOME: join(tmpdir(), 'edgeshard-test-config') },
  },
})
