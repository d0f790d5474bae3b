/**
 * Typed errors of the splitter (model and tokenizer loading). Tests and callers match on `.name`.
 */

/** Flattens a detail to one line so every error message stays a single line. */
function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, ' ')
}

/**
 * A model file is missing, unreadable, truncated, or not in a supported format (llama2.c checkpoint, GGUF).
 * The message is one line: `cannot load model <path>: <what was expected vs found>`.
 * @example
 * throw new ModelFormatError('/m/x.bin', 'file is 12 bytes, a llama2.c checkpoint needs at least 28')
 */
export class ModelFormatError extends Error {
  static override name = 'ModelFormatError'
  /** The model file (or directory) the error is about. */
  readonly path: string

  constructor(path: string, detail: string, options?: ErrorOptions) {
    super(oneLine(`cannot load model ${path}: ${detail}`), options)
    this.name = 'ModelFormatError'
    this.path = path
  }
}

/**
 * A tokenizer file or vocabulary is missing, truncated, or unusable (llama2.c tokenizer.bin, GGUF `tokenizer.ggml.*`).
 * The message is one line: `cannot load tokenizer <path>: <what was expected vs found>`.
 */
export class TokenizerFormatError extends Error {
  static override name = 'TokenizerFormatError'
  /** The tokenizer file, or a label of the vocabulary's source when it came from memory. */
  readonly path: string

  constructor(path: string, detail: string, options?: ErrorOptions) {
    super(oneLine(`cannot load tokenizer ${path}: ${detail}`), options)
    this.name = 'TokenizerFormatError'
    this.path = path
  }
}

/**
 * A chat template (GGUF `tokenizer.chat_template`, tokenizer_config.json `chat_template`) does not parse, or refused
 * the messages while rendering (the template called `raise_exception`). The message is one line naming `source`.
 */
export class ChatTemplateError extends Error {
  static override name = 'ChatTemplateError'
  /** Where the template came from (model path or label). */
  readonly source: string

  constructor(source: string, detail: string, options?: ErrorOptions) {
    super(oneLine(`chat template of ${source}: ${detail}`), options)
    this.name = 'ChatTemplateError'
    this.source = source
  }
}

/**
 * The devices of a cluster cannot hold the model: its weights, KV cache, embedding and classifier need more bytes than
 * their memory budgets give, or no split of indivisible units (KV heads, FFN blocks, layers) fits them. The message is
 * one line naming the device(s), their budgets and the bytes lacking.
 */
export class InsufficientMemoryError extends Error {
  static override name = 'InsufficientMemoryError'
  /** The devices considered, with their budgets (bytes). */
  readonly devices: readonly { readonly name: string; readonly budgetBytes: number }[]
  /** Bytes the model needs on these devices at the least. */
  readonly neededBytes: number
  /** Bytes lacking: neededBytes minus what the budgets hold (0 when only the indivisible units do not fit). */
  readonly lackingBytes: number

  constructor(
    devices: readonly { readonly name: string; readonly budgetBytes: number }[],
    neededBytes: number,
    lackingBytes: number,
    detail: string,
    options?: ErrorOptions,
  ) {
    super(oneLine(detail), options)
    this.name = 'InsufficientMemoryError'
    this.devices = devices
    this.neededBytes = neededBytes
    this.lackingBytes = lackingBytes
  }
}
