//! The gpualloc wire contract: prost messages and tonic clients/servers for
//! `gpualloc.{allocation,resourcepool,viewer,events}.v1`, generated at build
//! time from `proto/` with protox, plus the encoded descriptor set that every
//! service registers for gRPC server reflection.
//!
//! Nothing but generated code lives here; conversions into domain types are
//! in `gpualloc-domain`.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Encoded `FileDescriptorSet` of every gpualloc proto file (with imports),
/// for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gpualloc_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `google/rpc/status.proto` and
/// `google/rpc/error_details.proto`: served through reflection so that
/// clients such as grpcurl decode the error details gpualloc sends.
pub const RPC_DETAILS_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rpc_descriptor.bin"));

/// `gpualloc.resourcepool.v1`
pub mod resourcepool {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("gpualloc.resourcepool.v1");
    }
}

/// `gpualloc.allocation.v1`
pub mod allocation {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("gpualloc.allocation.v1");
    }
}

/// `gpualloc.viewer.v1`
pub mod viewer {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("gpualloc.viewer.v1");
    }
}

/// `gpualloc.events.v1`
pub mod events {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("gpualloc.events.v1");
    }
}
