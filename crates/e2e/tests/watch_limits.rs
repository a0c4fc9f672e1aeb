//! Watchers cannot exhaust a viewer: open streams are capped per tenant and
//! in all (RESOURCE_EXHAUSTED with a retry pushback past the cap, the
//! place freed when a stream closes), and a snapshot larger than a
//! watcher's buffer arrives whole, page by page at the client's pace.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, Tuning, tenant};
use gpualloc_proto::{events::v1 as ev, viewer::v1 as vpb};
use gpualloc_saga::{Payload, subjects};
use gpualloc_testkit::eventually;
use prost::Message;
use tonic::Code;

async fn watch(
    mesh: &Mesh,
    t: &str,
) -> Result<tonic::Streaming<vpb::WatchAllocationsResponse>, tonic::Status> {
    mesh.viewer()
        .watch_allocations(tenant(
            t,
            vpb::WatchAllocationsRequest {
                tenant: t.into(),
                allocation_id: String::new(),
                resume_versions: Default::default(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_streams_are_capped_per_tenant_and_in_all() {
    let tuning = Tuning {
        max_watchers: (3, 2),
        ..Tuning::default()
    };
    let mesh = Mesh::start_tuned(Backend::Sqlite, tuning).await;
    let a1 = watch(&mesh, "team-a").await.unwrap();
    let _a2 = watch(&mesh, "team-a").await.unwrap();
    let e = watch(&mesh, "team-a").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.metadata().get("grpc-retry-pushback-ms").is_some());
    // Another tenant has places of its own, up to the global cap.
    let _b1 = watch(&mesh, "team-b").await.unwrap();
    let e = watch(&mesh, "team-c").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Closing a stream frees its place.
    drop(a1);
    eventually(Duration::from_secs(10), "a freed place", || async {
        watch(&mesh, "team-a").await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_larger_than_the_buffer_arrives_whole() {
    let tuning = Tuning {
        watch_buffer: 16,
        ..Tuning::default()
    };
    let mesh = Mesh::start_tuned(Backend::Sqlite, tuning).await;
    // 1,200 allocations for one tenant, as the allocation service would
    // announce them (published as the operator, to fill the read model
    // fast): more than two snapshot pages and 75 buffers.
    let js = mesh.jetstream().await;
    let n = 1_200;
    let mut acks = Vec::new();
    for _ in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let now = prost_types::Timestamp {
            seconds: 1_790_000_000,
            nanos: 0,
        };
        let event = ev::Event {
            event_id: uuid::Uuid::now_v7().to_string(),
            allocation_id: id.clone(),
            tenant: "big".into(),
            aggregate_version: 1,
            event_time: Some(now),
            payload: Some(Payload::AllocationStateChanged(
                ev::AllocationStateChanged {
                    previous_state: 0,
                    allocation: Some(ev::AllocationSnapshot {
                        allocation_id: id,
                        tenant: "big".into(),
                        state: ev::AllocationState::Pending as i32,
                        version: 1,
                        create_time: Some(now),
                        update_time: Some(now),
                        ..Default::default()
                    }),
                    actor: String::new(),
                },
            )),
        };
        let ack = js
            .send_publish(
                format!("{}.{}", mesh.prefix, subjects::ALLOCATION_CHANGED),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(event.encode_to_vec().into())
                    .message_id(event.event_id.clone()),
            )
            .await
            .unwrap();
        acks.push(ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    gpualloc_e2e::fixtures::drained(&mesh, gpualloc_viewer::CONSUMER).await;

    let mut stream = watch(&mesh, "big").await.unwrap();
    let mut snapshot = std::collections::BTreeSet::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("the snapshot stalled")
            .unwrap()
            .expect("the stream ended");
        if m.r#type == vpb::WatchEventType::SnapshotEnd as i32 {
            break;
        }
        assert_eq!(m.r#type, vpb::WatchEventType::Snapshot as i32);
        let id = m.view.unwrap().allocation.unwrap().allocation_id;
        assert!(snapshot.insert(id), "a view was sent twice");
    }
    assert_eq!(snapshot.len(), n);
}
