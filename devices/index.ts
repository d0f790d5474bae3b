/** devices/: capabilities of real devices and links, cluster files. A leaf: imports nothing from agent/, splitter/, transport/. */
export {
  CAPABILITY_FIELDS,
  type CapabilityProblem,
  type DeviceCapabilities,
  describeValue,
  type LinkCapabilities,
  parseCapabilities,
  parseLink,
} from './capabilities.ts'
export {
  type ClusterDevice,
  type ClusterLinkPair,
  type ClusterSpec,
  clusterLink,
  DEFAULT_BUDGET_FRACTION,
  parseByteSize,
  parseClusterFile,
  readClusterFile,
} from './cluster-file.ts'
export { ClusterFileError } from './errors.ts'
export {
  DEVICE_PROFILE_NAMES,
  DEVICE_PROFILES,
  type KnownDeviceProfile,
  knownDeviceProfile,
  type LinkKind,
  TYPICAL_LINKS,
} from './profiles.ts'
