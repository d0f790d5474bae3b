/**
 * Versioned libp2p protocol ids of edgeshard (multistream-select names). Bump the version on any wire change:
 * peers only talk when both sides handle the exact id.
 */

/** Tensor-parallel traffic between the master and its workers: frames of `frame.ts` (allreduce, broadcasts). */
export const TENSOR_PARALLEL_PROTOCOL = '/edgeshard/tp/1.0.0'

/**
 * Agent status: the dialler sends `{ type: 'info' }` frames, the agent answers each with `{ type: 'info', profile }`
 * (its device profile, see agent/peer-info.ts), so the dialler can also time round trips; a request's body is ignored,
 * so a large one times throughput (agent/link-probe.ts).
 */
export const INFO_PROTOCOL = '/edgeshard/info/1.0.0'

/** mDNS service name edgeshard agents answer (not libp2p's default `_p2p._udp.local`: only edgeshard agents reply). */
export const MDNS_SERVICE_TAG = '_edgeshard._udp.local'

/** Split computing: a head peer sends encoded bottleneck tensors, the tail peer replies with the outputs (agent/split). */
export const SPLIT_PROTOCOL = '/edgeshard/split/1.0.0'

/**
 * Inside one pipeline stage without the master (agent/stage-worker.ts): the stage's leader dials each member, sends
 * `stage-join`, then relays forward passes and resets; allreduce frames flow as on the tensor-parallel protocol.
 */
export const STAGE_PROTOCOL = '/edgeshard/stage/1.0.0'

/**
 * Cluster survey before planning (agent/link-survey.ts): the master asks an agent to emulate its links for the
 * session (`survey-shape`), to measure its links to other agents over the info protocol (`survey-probe`), and to
 * measure its device and publish the result (`survey-measure`). Emulated links end with the stream.
 */
export const SURVEY_PROTOCOL = '/edgeshard/survey/1.0.0'
