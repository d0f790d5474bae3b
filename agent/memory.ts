import { readFileSync } from 'node:fs'

/** Peak and current resident set size of this process, bytes (/proc/self/status VmHWM, VmRSS). */
export function memoryUsage(): { rssBytes: number; peakRssBytes: number } {
  const rss = process.memoryUsage.rss()
  try {
    const status = readFileSync('/proc/self/status', 'utf8')
    const hwm = /VmHWM:\s+(\d+) kB/.exec(status)
    return { rssBytes: rss, peakRssBytes: hwm ? Number(hwm[1]) * 1024 : rss }
  } catch {
    return { rssBytes: rss, peakRssBytes: rss }
  }
}
