/**
 * Typed errors of split computing (graph cuts and split planning). Match on `.name` (STYLE: `static name` and
 * `this.name`, after js-libp2p `interface/src/errors.ts`). Messages are one line and name the tensor, node or value.
 */

/**
 * A requested cut is not a valid head/tail split: an unknown tensor, a tail that would need a tensor computed before
 * the cut that is not in the cut, a node that would run on both sides, or a crossing tensor of unknown type.
 */
export class CutError extends Error {
  static override name = 'CutError'

  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'CutError'
  }
}

/**
 * A cut goes through a control-flow subgraph (a tensor that only exists inside the body of an `If`, `Loop` or `Scan`
 * node). Cut before or after the control-flow node instead; the node then stays whole on one side.
 */
export class ControlFlowCutError extends Error {
  static override name = 'ControlFlowCutError'
  /** The control-flow node (its name, or `opType#index` when unnamed). */
  readonly node: string

  constructor(node: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'ControlFlowCutError'
    this.node = node
  }
}

/** A cut goes through a model-local function (a tensor that only exists inside a `FunctionProto` body). */
export class LocalFunctionCutError extends Error {
  static override name = 'LocalFunctionCutError'
  /** `domain:name` of the function. */
  readonly fn: string

  constructor(fn: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'LocalFunctionCutError'
    this.fn = fn
  }
}

/** The split planner has nothing to choose from: no option profiled, or none meets the accuracy constraint. */
export class PlanError extends Error {
  static override name = 'PlanError'

  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = 'PlanError'
  }
}
