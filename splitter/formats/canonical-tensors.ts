/**
 * The canonical tensor set of a Llama-family model (names and shapes per `ModelDescription` in ../model.ts), checked
 * the same way for every format.
 */
import { ModelFormatError } from '../errors.ts'
import type { LlamaConfig, TensorRef } from '../model.ts'

/** Canonical names and shapes (outermost first) that `config` implies, biases included when `config.qkvBias`. */
export function canonicalShapes(config: LlamaConfig): [string, number[]][] {
  const { dim, hiddenDim, nHeads, nKvHeads, headDim, vocabSize } = config
  const expected: [string, number[]][] = [
    ['token_embd.weight', [vocabSize, dim]],
    ['output_norm.weight', [dim]],
    ['output.weight', [vocabSize, dim]],
  ]
  for (let i = 0; i < config.nLayers; i++) {
    expected.push(
      [`blk.${i}.attn_norm.weight`, [dim]],
      [`blk.${i}.attn_q.weight`, [nHeads * headDim, dim]],
      [`blk.${i}.attn_k.weight`, [nKvHeads * headDim, dim]],
      [`blk.${i}.attn_v.weight`, [nKvHeads * headDim, dim]],
      [`blk.${i}.attn_output.weight`, [dim, nHeads * headDim]],
      [`blk.${i}.ffn_norm.weight`, [dim]],
      [`blk.${i}.ffn_gate.weight`, [hiddenDim, dim]],
      [`blk.${i}.ffn_down.weight`, [dim, hiddenDim]],
      [`blk.${i}.ffn_up.weight`, [hiddenDim, dim]],
    )
    if (config.qkvBias === true) {
      expected.push(
        [`blk.${i}.attn_q.bias`, [nHeads * headDim]],
        [`blk.${i}.attn_k.bias`, [nKvHeads * headDim]],
        [`blk.${i}.attn_v.bias`, [nKvHeads * headDim]],
      )
    }
  }
  return expected
}

/**
 * Checks that every canonical tensor exists with the shape `config` implies.
 * Errors: ModelFormatError naming `path` and the tensor (`tensor blk.0.ffn_up.weight is missing`,
 * `tensor … has shape [6, 4], the config implies [8, 4]`). `describe` may add where the tensor comes from.
 */
export function checkTensorShapes(
  path: string,
  config: LlamaConfig,
  tensors: ReadonlyMap<string, TensorRef>,
  describe: (name: string) => string = (name) => name,
): void {
  for (const [name, shape] of canonicalShapes(config)) {
    const t = tensors.get(name)
    if (t === undefined) throw new ModelFormatError(path, `tensor ${describe(name)} is missing`)
    if (t.shape.length !== shape.length || t.shape.some((d, k) => d !== shape[k])) {
      throw new ModelFormatError(
        path,
        `tensor ${describe(name)} has shape [${t.shape.join(', ')}], the config implies [${shape.join(', ')}]`,
      )
    }
  }
}
