/**
 * Typed errors of devices/ (cluster files, device capabilities). Tests and callers match on `.name`.
 */

/** Flattens a detail to one line so every error message stays a single line. */
function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, ' ')
}

/**
 * A cluster file is missing, not JSON, or does not have the documented shape (README, "Cluster files").
 * The message is one line: `cannot read cluster file <path>: <JSON path>: <what was expected>, got <what was found>`.
 * @example
 * throw new ClusterFileError('pi.json', 'devices[1].profile', 'expected a known profile name, got "pi9"')
 */
export class ClusterFileError extends Error {
  static override name = 'ClusterFileError'
  /** The cluster file (or a label of its source when parsed from memory). */
  readonly path: string
  /** Where in the document, e.g. `devices[2].memoryBudget` (`$` for the whole document). */
  readonly jsonPath: string

  constructor(path: string, jsonPath: string, detail: string, options?: ErrorOptions) {
    super(oneLine(`cannot read cluster file ${path}: ${jsonPath}: ${detail}`), options)
    this.name = 'ClusterFileError'
    this.path = path
    this.jsonPath = jsonPath
  }
}
