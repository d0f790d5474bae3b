import { existsSync } from 'node:fs'
import { type Browser, chromium } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { OpenAiServer } from '../../../agent/server/index.ts'
import { ScriptEngine } from './script-engine.ts'

// The built-in chat page at `/`, in Debian's headless Chromium driven by playwright-core, against the server over a
// stand-in engine: the answer streams into the page, and Stop cancels the generation on the server.

const CHROMIUM = '/usr/bin/chromium'
const HAVE_CHROMIUM = existsSync(CHROMIUM)
if (!HAVE_CHROMIUM) process.stderr.write(`skipping the chat page test: ${CHROMIUM} is absent (apt-get install chromium)\n`)

describe.skipIf(!HAVE_CHROMIUM)('chat page in headless Chromium', () => {
  const engine = new ScriptEngine()
  const server = new OpenAiServer({ engine, port: 0 })
  let browser: Browser

  beforeAll(async () => {
    await server.start()
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    })
  })
  afterAll(async () => {
    await browser?.close()
    await server.stop()
  })

  it('streams an answer into the page, keeps the conversation, and Stop cancels the generation', async () => {
    const page = await browser.newPage()
    const pageErrors: string[] = []
    page.on('pageerror', (e) => pageErrors.push(e.message))
    await page.goto(server.url)
    await expect.poll(() => page.textContent('#model')).toBe('script')

    engine.tokenDelayMs = 20
    await page.fill('#prompt', 'hello there')
    await page.press('#prompt', 'Enter')
    const first = page.locator('.msg.assistant').nth(0)
    await first.and(page.locator('[data-done="true"]')).waitFor({ timeout: 10_000 })
    expect(await first.textContent()).toBe('Hello world, how are you?')
    expect(await page.locator('.msg.user').allTextContents()).toEqual(['hello there'])

    // The second turn carries the history: user, assistant, user → 1 + 2 + 5 + 1 tokens in the stand-in's encoding.
    engine.tokenDelayMs = 1000
    await page.fill('#prompt', 'and then')
    await page.click('#send')
    const second = page.locator('.msg.assistant').nth(1)
    await expect.poll(() => second.textContent(), { timeout: 10_000 }).toBe('Hello')
    await page.click('#stop')
    await second.and(page.locator('[data-done="stopped"]')).waitFor({ timeout: 10_000 })
    // On a loaded machine one more token may land between the poll and the click: the answer stops where Stop found
    // it, a proper prefix of the full one, and stays there.
    const stoppedAt = (await second.textContent()) ?? ''
    expect(['Hello', 'Hello world']).toContain(stoppedAt)
    await expect.poll(() => engine.started.length).toBe(2)
    await new Promise((r) => setTimeout(r, 1500))
    expect(engine.finished).toEqual([engine.started[0]]) // the stopped generation never ran to its end
    expect(engine.started[1]).toBe('10')
    expect(await second.textContent()).toBe(stoppedAt)
    expect(pageErrors).toEqual([])
  }, 60_000)
})
