import { defineConfig } from 'vitest/config'

// `npm run test:scale`: real-scale models (synthetic, hundreds of MB), too slow for `npm test`.
export default defineConfig({
  test: {
    pool: 'forks',
    include: ['test/scale/**/*.test.ts'],
    testTimeout: 900_000,
    hookTimeout: 900_000,
  },
})
