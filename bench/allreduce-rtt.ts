/**
 * Prints the round-trip time of one star allreduce of 8192 f32 with 3 workers over loopback in one process
 * (median and p99 over 200, after 20 warm-up rounds). Run: node bench/allreduce-rtt.ts
 */
import { cpus, loadavg } from 'node:os'
import { randomF32, seededRandom, startStarCluster } from '../test/transport/helpers.ts'

const N = 8192
const ROUNDS = 200
const WARMUP = 20
const cluster = await startStarCluster(3)
const random = seededRandom(7)
const partials = Array.from({ length: 4 }, () => randomF32(random, N))
const times: number[] = []
for (let round = 0; round < WARMUP + ROUNDS; round++) {
  const start = performance.now()
  await Promise.all([
    cluster.hub.allreduce(round, partials[0]!),
    ...cluster.members.map((m, i) => m.allreduce(round, partials[i + 1]!)),
  ])
  if (round >= WARMUP) times.push(performance.now() - start)
}
await cluster.stop()
times.sort((a, b) => a - b)
const at = (q: number): string => times[Math.min(times.length - 1, Math.floor(q * times.length))]!.toFixed(3)
console.log(
  `star allreduce ${N} f32, 3 workers, loopback, 1 process, noise+yamux: median ${at(0.5)} ms, p90 ${at(0.9)} ms, ` +
    `p99 ${at(0.99)} ms over ${ROUNDS} (load ${loadavg().map((l) => l.toFixed(2)).join(' ')}, ${cpus().length} cpus)`,
)
