import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import type { Cluster } from '../../../agent/cluster.ts'
import { ClusterEngine, modelIdOf } from '../../../agent/server/index.ts'
import type { HfTokenizer } from '../../../agent/tokenizer/hf-tokenizer.ts'
import { loadTokenizer } from '../../../agent/tokenizer/load-tokenizer.ts'
import { loadModel, type ModelDescription } from '../../../splitter/index.ts'
import { HAVE_MODELS, MODELS_DIR } from '../../support/cli.ts'
import { buildTinyQwen2 } from '../../splitter/formats/byte-level-fixture.ts'

// How the server turns chat messages into prompt tokens (no cluster needed: encoding happens on the master only).

/** The parts of a cluster `ClusterEngine` reads before generating. */
function standIn(model: ModelDescription): Cluster {
  return { model, plan: { model: { maxSeqLen: model.config.maxSeqLen } } } as unknown as Cluster
}

const dir = mkdtempSync(join(tmpdir(), 'edgeshard-engine-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('ClusterEngine prompt encoding', () => {
  it("renders the model's chat template; special-token text becomes its id, with no BOS added", () => {
    const path = join(dir, 'qwen-tiny.gguf')
    writeFileSync(path, buildTinyQwen2())
    const model = loadModel(path)
    const tok = loadTokenizer(model) as HfTokenizer
    const engine = new ClusterEngine(standIn(model), tok)
    const ids = engine.encodeChat([
      { role: 'system', content: 'be brief' },
      { role: 'user', content: 'the cat' },
    ])
    const expected = '<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n'
    expect(ids).toEqual(tok.encode(expected, { bos: false }))
    expect(ids[0]).toBe(tok.tokenToId('<|im_start|>'))
    expect(ids.filter((i) => i === tok.tokenToId('<|im_end|>'))).toHaveLength(2)
    expect(engine.modelId).toBe('qwen-tiny')
    expect(engine.contextLength).toBe(64)
  })

  it.skipIf(!HAVE_MODELS)('without a template (stories260K) joins `role: content` lines and ends with `assistant:`', () => {
    const model = loadModel(join(MODELS_DIR, 'stories260K.bin'))
    const tok = loadTokenizer(model)
    const engine = new ClusterEngine(standIn(model), tok)
    const ids = engine.encodeChat([
      { role: 'system', content: 'You tell stories.' },
      { role: 'user', content: 'Once upon a time' },
    ])
    expect(ids).toEqual(tok.encode('system: You tell stories.\nuser: Once upon a time\nassistant:'))
    expect(ids[0]).toBe(tok.bosId)
    expect(engine.encodePrompt('Once upon a time')).toEqual([1, 403, 407, 261, 378])
  })

  it('names the model after its file', () => {
    expect(modelIdOf('/m/stories260K.bin')).toBe('stories260K')
    expect(modelIdOf('/m/Qwen2.5-0.5B-Instruct/')).toBe('Qwen2.5-0.5B-Instruct')
    expect(modelIdOf('/m/tinyllama.q4_0.gguf')).toBe('tinyllama.q4_0')
  })
})
