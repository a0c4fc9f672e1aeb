//! Calls any RPC by its path with an encoded request: the authorization
//! matrix and the wire fuzzer go through every method of the descriptor
//! set without a typed client for each.

use std::str::FromStr;

use bytes::{Buf, BufMut, Bytes};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Passes encoded messages through.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// Every RPC of the three public services (the methods the servers know,
/// less health and reflection), in order.
pub fn public_methods() -> Vec<String> {
    let mut out: Vec<String> = gpualloc_platform::layers::metrics::known_methods()
        .iter()
        .filter(|p| p.starts_with("/gpualloc."))
        .cloned()
        .collect();
    out.sort();
    out
}

/// Whether the method at `path` streams its response.
pub fn is_streaming(path: &str) -> bool {
    path.ends_with("/WatchAllocations")
}

/// Calls `path` with `body` and bearer `token`; returns the status code
/// (for a stream: of its first message or its end).
pub async fn call(channel: Channel, path: &str, body: Bytes, token: Option<&str>) -> Code {
    let mut request = Request::new(body);
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        request.metadata_mut().insert("authorization", v);
    }
    request.set_timeout(std::time::Duration::from_secs(10));
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Status::from_error(Box::new(e)).code();
    }
    let Ok(path_q) = http::uri::PathAndQuery::from_str(path) else {
        return Code::InvalidArgument;
    };
    if is_streaming(path) {
        match grpc.server_streaming(request, path_q, Raw).await {
            Err(s) => s.code(),
            Ok(r) => match r.into_inner().message().await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            },
        }
    } else {
        match grpc.unary(request, path_q, Raw).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        }
    }
}
