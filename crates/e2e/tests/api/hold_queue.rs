//! Hold positions that stay true: after a higher-priority request jumps
//! the queue, the viewer shows the waiting allocation's current position,
//! the allocation's reason no longer names a position that went stale, and
//! ListHeld estimates when each starts from the leases that end.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, fixtures::*, tenant};
use gpualloc_proto::{allocation::v1 as apb, allocation::v1::State, viewer::v1 as vpb};
use gpualloc_testkit::eventually;

fn request(n: i32, priority: i32, lease_secs: i64) -> apb::CreateAllocationRequest {
    apb::CreateAllocationRequest {
        tenant: "t".into(),
        resources: Some(gpus(n, "A100")),
        priority,
        lease: Some(prost_types::Duration {
            seconds: lease_secs,
            nanos: 0,
        }),
        ..Default::default()
    }
}

async fn position(mesh: &Mesh, id: &str) -> i64 {
    mesh.viewer()
        .get_allocation_view(tenant(
            "t",
            vpb::GetAllocationViewRequest {
                allocation_id: id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .hold_position
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn positions_follow_the_queue_and_starts_are_estimated() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 1)])).await;
    set_quota(&mesh, "t", gpus(10, "")).await;

    // The only GPU, for an hour.
    let running = create_request(&mesh, "t", request(1, 0, 3600)).await;
    let running = wait_state(&mesh, "t", &running.allocation_id, State::Allocated).await;
    let ends = running.expire_time.unwrap().seconds;

    let waiting = create_request(&mesh, "t", request(1, 0, 600)).await;
    wait_view(&mesh, "t", &waiting.allocation_id, State::Held).await;
    assert_eq!(position(&mesh, &waiting.allocation_id).await, 1);

    // A priority-10 request jumps the queue.
    let urgent = create_request(&mesh, "t", request(1, 10, 60)).await;
    wait_view(&mesh, "t", &urgent.allocation_id, State::Held).await;
    assert_eq!(position(&mesh, &urgent.allocation_id).await, 1);
    assert_eq!(
        position(&mesh, &waiting.allocation_id).await,
        2,
        "the viewer still shows the position the request was queued at"
    );
    let listed = mesh
        .viewer()
        .list_allocation_views(tenant(
            "t",
            vpb::ListAllocationViewsRequest {
                tenant: "t".into(),
                states: vec![State::Held as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .allocations;
    let positions: Vec<(String, i64)> = listed
        .iter()
        .map(|v| {
            (
                v.allocation.as_ref().unwrap().allocation_id.clone(),
                v.hold_position,
            )
        })
        .collect();
    assert!(
        positions.contains(&(waiting.allocation_id.clone(), 2)),
        "{positions:?}"
    );

    // The allocation's reason names no position that can go stale.
    let held = get(&mesh, "t", &waiting.allocation_id).await;
    assert!(held.reason.contains("ListHeld"), "{}", held.reason);
    assert!(!held.reason.contains("position 1"), "{}", held.reason);

    // ListHeld: current positions and estimated starts from the leases:
    // the urgent one when the running lease ends, the other when the
    // urgent one's own 60 s lease ends after that.
    let queue = eventually(Duration::from_secs(20), "both held", || async {
        let q = list_held(&mesh, "p").await;
        (q.len() == 2).then_some(q)
    })
    .await;
    assert_eq!(queue[0].allocation_id, urgent.allocation_id);
    assert_eq!((queue[0].position, queue[1].position), (1, 2));
    let start = |i: usize| queue[i].estimated_start_time.as_ref().unwrap().seconds;
    assert!((start(0) - ends).abs() <= 1, "{} vs {ends}", start(0));
    assert!(
        (start(1) - (ends + 60)).abs() <= 1,
        "{} vs {}",
        start(1),
        ends + 60
    );
}
