/**
 * Public surface of edgeshard's transport: wire frames, framed libp2p channels, the transport node, and allreduce.
 * Other folders import only this file.
 */
export type { Allreduce, AllreduceLink, AllreduceOptions, StarAllreduceOptions, WireDtype } from './allreduce.ts'
export {
  ALLREDUCE_FRAME_TYPE,
  createInProcessAllreduce,
  StarAllreduceHub,
  StarAllreduceMember,
  WIRE_DTYPES,
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
  PeerStalledError,
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
export type {
  ChannelHandler,
  DialOptions,
  DiscoveredPeer,
  DiscoveryOptions,
  MembershipOptions,
  MembershipRefusal,
  TransportNodeOptions,
} from './node.ts'
export { DEFAULT_DIAL_TIMEOUT_MS, TransportNode } from './node.ts'
export { INFO_PROTOCOL, MDNS_SERVICE_TAG, TENSOR_PARALLEL_PROTOCOL } from './protocols.ts'
export { SPLIT_PROTOCOL, STAGE_PROTOCOL, SURVEY_PROTOCOL } from './protocols.ts'
export {
  type BottleneckCodec,
  CODEC_COMPRESSIONS,
  CODEC_QUANTIZATIONS,
  type CodecCompression,
  type CodecElementType,
  codecName,
  type CodecQuantization,
  type CodecTensor,
  type DecodedTensor,
  type DecodeOptions,
  decodeBottleneck,
  encodeBottleneck,
  f16BitsToF32,
  f32ToF16Bits,
  parseCodec,
} from './bottleneck-codec.ts'
export { CodecError, DuplicateIdentityError, MembershipError } from './errors.ts'
export { type FrameLink, type LinkEmulation, LinkShaper, parseLinkEmulation, ShapedChannel } from './link-shaper.ts'
