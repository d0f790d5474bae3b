/**
 * Versioned libp2p protocol ids of edgeshard (multistream-select names). Bump the version on any wire change:
 * peers only talk when both sides handle the exact id.
 */

/** Tensor-parallel traffic between the master and its workers: frames of `frame.ts` (allreduce, broadcasts). */
export const TENSOR_PARALLEL_PROTOCOL = '/edgeshard/tp/1.0.0'
