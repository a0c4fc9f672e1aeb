//! The saga's events are a contract of their own: `gpualloc.events.v1`
//! must not import the public API, or an API change would silently change
//! what is on the stream and what the viewer has stored.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use prost::Message;
use prost_types::FileDescriptorSet;

#[test]
fn the_events_import_nothing_of_the_public_api() {
    let set = FileDescriptorSet::decode(gpualloc_proto::FILE_DESCRIPTOR_SET).unwrap();
    let events = set
        .file
        .iter()
        .find(|f| f.package() == "gpualloc.events.v1")
        .unwrap();
    let ours: Vec<&String> = events
        .dependency
        .iter()
        .filter(|d| !d.starts_with("google/protobuf/"))
        .collect();
    assert!(ours.is_empty(), "events.proto imports {ours:?}");
    // And no field names a message or enum of another gpualloc package.
    for message in &events.message_type {
        for field in &message.field {
            let ty = field.type_name();
            assert!(
                ty.is_empty()
                    || ty.starts_with(".gpualloc.events.v1.")
                    || ty.starts_with(".google."),
                "{}.{} is a {ty}",
                message.name(),
                field.name()
            );
        }
    }
}
