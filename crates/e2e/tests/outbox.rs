//! An outbox row that cannot be published — here an event larger than the
//! stream accepts — is set aside after a few attempts instead of blocking
//! every row behind it; it shows in a metric and in the operator's
//! `outbox` command, and once the limit is raised a requeue publishes it
//! and the viewer converges. A tenant cannot make such a row in the first
//! place: requests naming too many custom classes are refused.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gpualloc_e2e::{Backend, Mesh, fixtures::*, tenant};
use gpualloc_platform::outbox_cmd;
use gpualloc_proto::{allocation::v1 as apb, resourcepool::v1 as rp};
use gpualloc_testkit::eventually;
use tonic::Code;

async fn set_stream_limit(mesh: &Mesh, max: i32) {
    let mut config = stream_info(mesh).await.config;
    config.max_message_size = max;
    mesh.jetstream().await.update_stream(config).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_broker_refuses_is_set_aside_and_requeued_later() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota(&mesh, "team-a", gpus(4, "")).await;
    set_stream_limit(&mesh, 4096).await;

    // 32 labels of 200 characters: every AllocationStateChanged of this
    // allocation is larger than the stream now takes.
    let labels = (0..32)
        .map(|i| (format!("k{i}"), "v".repeat(200)))
        .collect();
    let big = mesh
        .allocations()
        .create_allocation(tenant(
            "team-a",
            apb::CreateAllocationRequest {
                tenant: "team-a".into(),
                resources: Some(gpus(1, "A100")),
                labels,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // Its small AllocationRequested still goes out: the pool grants it.
    wait_state(&mesh, "team-a", &big.allocation_id, apb::State::Allocated).await;
    // And the rows behind the big ones are not held up.
    let small = create(&mesh, "team-a", gpus(1, "A100")).await;
    wait_view(&mesh, "team-a", &small.allocation_id, apb::State::Allocated).await;

    let db = open_db(&mesh.allocation_db).await;
    let aside = eventually(Duration::from_secs(20), "rows set aside", || async {
        let rows = outbox_cmd::list(&db, 100).await.unwrap();
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    for r in &aside {
        assert_eq!(r.aggregate_id, big.allocation_id);
        assert!(r.attempts >= 5, "{r:?}");
        assert!(
            r.last_error.as_deref().unwrap_or("").contains("maximum"),
            "{r:?}"
        );
    }
    let text = gpualloc_telemetry::METRICS.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("gpualloc_outbox_poison{")
                && l.contains("allocation")
                && !l.ends_with(" 0")),
        "no gpualloc_outbox_poison for allocation:\n{text}"
    );
    let e = mesh
        .viewer()
        .get_allocation_view(tenant(
            "team-a",
            gpualloc_proto::viewer::v1::GetAllocationViewRequest {
                allocation_id: big.allocation_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "the viewer has not seen it yet");

    // The operator raises the limit and requeues: the viewer converges.
    set_stream_limit(&mesh, -1).await;
    let n = outbox_cmd::requeue(&db, Vec::new()).await.unwrap();
    assert_eq!(n, aside.len());
    wait_view(&mesh, "team-a", &big.allocation_id, apb::State::Allocated).await;
    assert!(outbox_cmd::list(&db, 100).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_with_too_many_custom_classes_are_refused() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    let custom = (0..65).map(|i| (format!("class{i}"), 1)).collect();
    let e = mesh
        .allocations()
        .create_allocation(tenant(
            "team-a",
            apb::CreateAllocationRequest {
                tenant: "team-a".into(),
                resources: Some(rp::Resources {
                    custom,
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most 64 custom classes"), "{e:?}");
    assert_eq!(
        count(&mesh.allocation_db, "SELECT COUNT(*) AS n FROM allocations").await,
        0
    );
}
