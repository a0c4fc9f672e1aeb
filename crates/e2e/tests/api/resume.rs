//! A watcher that reconnects with the last version it saw of each
//! allocation (`resume_versions`) — after a dropped connection, or after
//! the viewer replica it watched restarted — gets no snapshot of those,
//! then every version it missed, once and in order, then live changes;
//! allocations it did not know come in the snapshot as usual.

use std::{collections::BTreeMap, time::Duration};

use gpualloc_e2e::{Backend, Mesh, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::State,
    viewer::v1::{self as vpb, WatchEventType},
};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming};

const DEADLINE: Duration = Duration::from_secs(30);

async fn watch(
    mesh: &Mesh,
    resume: BTreeMap<String, i64>,
) -> Result<Streaming<vpb::WatchAllocationsResponse>, tonic::Status> {
    mesh.viewer()
        .watch_allocations(tenant(
            "t",
            vpb::WatchAllocationsRequest {
                tenant: String::new(),
                allocation_id: String::new(),
                resume_versions: resume.into_iter().collect(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

/// One message: its type, allocation and version.
async fn next(stream: &mut Streaming<vpb::WatchAllocationsResponse>) -> (i32, String, i64) {
    let m = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("a message in time")
        .expect("the stream open")
        .expect("no error");
    let a = m.view.and_then(|v| v.allocation).unwrap_or_default();
    (m.r#type, a.allocation_id, a.version)
}

/// Reads until SNAPSHOT_END: the snapshot's (id, version).
async fn snapshot(stream: &mut Streaming<vpb::WatchAllocationsResponse>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    loop {
        let (kind, id, version) = next(stream).await;
        if kind == WatchEventType::SnapshotEnd as i32 {
            return out;
        }
        assert_eq!(kind, WatchEventType::Snapshot as i32);
        out.insert(id, version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_watch_gets_what_it_missed_once_in_order() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota(&mesh, "t", gpus(4, "")).await;
    let a = create(&mesh, "t", gpus(1, "A100")).await;
    let b = create(&mesh, "t", gpus(1, "A100")).await;
    for x in [&a, &b] {
        wait_view(&mesh, "t", &x.allocation_id, State::Allocated).await;
    }
    let mut first = watch(&mesh, BTreeMap::new()).await.unwrap();
    let seen = snapshot(&mut first).await;
    assert_eq!(seen[&a.allocation_id], 2);
    assert_eq!(seen[&b.allocation_id], 2);
    drop(first);

    // While it is away: a is cancelled (v3, v4), c is new; and the viewer
    // restarts, as a replica does in a rolling upgrade.
    cancel(&mesh, "t", &a.allocation_id).await.unwrap();
    wait_view(&mesh, "t", &a.allocation_id, State::Cancelled).await;
    let c = create(&mesh, "t", gpus(1, "A100")).await;
    wait_view(&mesh, "t", &c.allocation_id, State::Allocated).await;
    mesh.viewer.restart().await;
    mesh.viewer.wait_serving().await;

    let mut again = watch(&mesh, seen.clone()).await.unwrap();
    // Only the allocation it did not know is in the snapshot.
    let fresh = snapshot(&mut again).await;
    assert_eq!(fresh.keys().collect::<Vec<_>>(), [&c.allocation_id]);
    // Then what it missed of a, in order; nothing of b (nothing changed).
    let missed = [next(&mut again).await, next(&mut again).await];
    let change = WatchEventType::Change as i32;
    assert_eq!(
        missed,
        [
            (change, a.allocation_id.clone(), 3),
            (change, a.allocation_id.clone(), 4)
        ]
    );
    // And live from there, without repeating anything.
    cancel(&mesh, "t", &b.allocation_id).await.unwrap();
    assert_eq!(next(&mut again).await, (change, b.allocation_id.clone(), 3));
    assert_eq!(next(&mut again).await, (change, b.allocation_id.clone(), 4));

    // A resume point names allocations by id.
    let Err(bad) = watch(&mesh, BTreeMap::from([("not-an-id".to_owned(), 1)])).await else {
        panic!("a resume point with a bad id was accepted")
    };
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("resume_versions"), "{bad:?}");
}
