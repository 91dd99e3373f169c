//! The CNI error codes weft uses, with the situation each is for.
//!
//! Codes below 100 are the spec's well-known codes; 100 and up are weft's
//! own. Every failure the plugin can report is one of these, so a runtime
//! (and an operator reading kubelet's events) can tell a bad config from a
//! node that is merely not ready yet. datapath-svc picks the code for a
//! failure it knows best and sends it in [`crate::CODE_METADATA_KEY`]; the
//! plugin prints it.

/// The config's `cniVersion` is not one this plugin speaks, or the
/// command needs a newer version (CHECK ≥ 0.4.0, STATUS/GC ≥ 1.1.0).
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// A field of the config has a value this plugin does not support.
pub const UNSUPPORTED_FIELD: u32 = 2;
/// The container or attachment is unknown to datapath-svc (CHECK).
pub const UNKNOWN_CONTAINER: u32 = 3;
/// A `CNI_*` variable is missing or malformed, or datapath-svc refused a
/// value that came from one.
pub const INVALID_ENV: u32 = 4;
/// Reading stdin or writing the DEL queue failed.
pub const IO_FAILURE: u32 = 5;
/// The config on stdin is not JSON, or not a JSON object.
pub const DECODE_FAILURE: u32 = 6;
/// The config is JSON but a field is missing, of the wrong type or out
/// of range, or datapath-svc refused a value from it.
pub const INVALID_CONFIG: u32 = 7;
/// datapath-svc is down, not ready, or did not answer in time.
pub const TRY_AGAIN_LATER: u32 = 11;
/// STATUS: datapath-svc is not there to add pods.
pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
/// STATUS: datapath-svc answers but existing pods may have limited
/// connectivity (only ever sent by datapath-svc via `cni-code`).
pub const LIMITED_CONNECTIVITY: u32 = 51;
/// datapath-svc failed internally (gRPC Internal, Unknown, DataLoss),
/// or returned a result that is not a valid CNI result.
pub const DATAPATH_INTERNAL: u32 = 100;
/// Out of a resource: no pod IP left in the node's CIDR, a full map
/// (gRPC ResourceExhausted).
pub const RESOURCE_EXHAUSTED: u32 = 101;
/// The attachment already exists with different parameters (gRPC
/// AlreadyExists).
pub const ALREADY_EXISTS: u32 = 102;
/// datapath-svc refused the caller (gRPC PermissionDenied,
/// Unauthenticated).
pub const PERMISSION_DENIED: u32 = 103;
/// datapath-svc does not implement the command (gRPC Unimplemented):
/// the plugin and the daemon are of different releases.
pub const UNIMPLEMENTED: u32 = 104;
/// Plumbing the pod's network failed: the veth pair, its addresses and
/// routes, or the eBPF programs on it.
pub const NETWORK_SETUP: u32 = 105;
/// CHECK: the pod's network is not as ADD left it (a link down or gone,
/// an address, route, MTU or MAC changed, the eBPF programs detached).
pub const NETWORK_CHANGED: u32 = 106;
