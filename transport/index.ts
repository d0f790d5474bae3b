/**
 * Public surface of edgeshard's transport: wire frames, framed libp2p channels, the transport node, and allreduce.
 * Other folders import only this file.
 */
export type { Allreduce, AllreduceLink, AllreduceOptions } from './allreduce.ts'
export {
  ALLREDUCE_FRAME_TYPE,
  createInProcessAllreduce,
  StarAllreduceHub,
  StarAllreduceMember,
} from './allreduce.ts'
export type { ChannelRemote, ChannelStream, FramedChannelOptions } from './channel.ts'
export { CLOSE_FRAME_TYPE, FramedChannel } from './channel.ts'
export {
  AllreduceError,
  ChannelClosedError,
  DialError,
  FrameError,
  NotStartedError,
  PeerGoneError,
} from './errors.ts'
export type { Frame, FrameHeader, FrameOptions } from './frame.ts'
export {
  BODY_ALIGNMENT_BYTES,
  DEFAULT_MAX_FRAME_BYTES,
  encodeFrame,
  f32Body,
  FRAME_PREFIX_BYTES,
  FrameDecoder,
  MAX_HEADER_BYTES,
} from './frame.ts'
export type { ChannelHandler, TransportNodeOptions } from './node.ts'
export { DEFAULT_DIAL_TIMEOUT_MS, TransportNode } from './node.ts'
export { TENSOR_PARALLEL_PROTOCOL } from './protocols.ts'
