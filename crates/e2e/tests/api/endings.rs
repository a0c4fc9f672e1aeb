//! Who did what, and when it ended: a cancelled, expired or rejected
//! allocation carries its end_time, one cancelled before its lease ran out
//! shows no expire_time in the future, and the viewer's history names who
//! cancelled, approved or rejected (the verified caller's subject) and why.

#![allow(clippy::unwrap_used)]

use gpualloc_e2e::{Backend, Mesh, admin, fixtures::*};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    resourcepool::v1 as rp,
    viewer::v1 as vpb,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ended_allocations_say_when() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 2)])).await;
    set_quota(&mesh, "t", gpus(2, "")).await;

    let a = create_request(
        &mesh,
        "t",
        apb::CreateAllocationRequest {
            tenant: "t".into(),
            resources: Some(gpus(1, "A100")),
            lease: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    let running = wait_state(&mesh, "t", &a.allocation_id, State::Allocated).await;
    assert!(running.expire_time.is_some());
    assert!(running.end_time.is_none(), "{running:?}");

    cancel(&mesh, "t", &a.allocation_id).await.unwrap();
    let done = wait_state(&mesh, "t", &a.allocation_id, State::Cancelled).await;
    let end = done.end_time.expect("a cancelled allocation has an end");
    assert!(end.seconds >= running.update_time.unwrap().seconds);
    assert!(
        done.expire_time.is_none(),
        "a lease that never ran out: {done:?}"
    );
    let view = wait_view(&mesh, "t", &a.allocation_id, State::Cancelled).await;
    let seen = view.allocation.unwrap();
    assert_eq!(seen.end_time, Some(end));
    assert!(seen.expire_time.is_none());

    let history = |id: String| {
        let mut viewer = mesh.viewer();
        async move {
            viewer
                .list_allocation_history(gpualloc_e2e::tenant(
                    "t",
                    vpb::ListAllocationHistoryRequest { allocation_id: id },
                ))
                .await
                .unwrap()
                .into_inner()
                .entries
        }
    };
    let trail = history(a.allocation_id.clone()).await;
    let cancelling = trail
        .iter()
        .find(|e| e.state == State::Cancelling as i32)
        .unwrap();
    assert_eq!(cancelling.actor, "user@t", "{trail:?}");
    assert!(
        trail
            .iter()
            .filter(|e| e.state != State::Cancelling as i32)
            .all(|e| e.actor.is_empty()),
        "the saga's own steps name nobody: {trail:?}"
    );

    // Rejected by an administrator.
    mesh.pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: "t".into(),
            approval_above: Some(gpus(1, "")),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["approval_above".into()],
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    let r = create(&mesh, "t", gpus(2, "A100")).await;
    wait_state(&mesh, "t", &r.allocation_id, State::AwaitingApproval).await;
    mesh.allocations()
        .reject_allocation(admin(apb::RejectAllocationRequest {
            allocation_id: r.allocation_id.clone(),
            reason: "not this month".into(),
        }))
        .await
        .unwrap();
    let rejected = wait_state(&mesh, "t", &r.allocation_id, State::Rejected).await;
    assert!(rejected.end_time.is_some(), "{rejected:?}");
    wait_view(&mesh, "t", &r.allocation_id, State::Rejected).await;
    let trail = history(r.allocation_id.clone()).await;
    let last = trail.last().unwrap();
    assert_eq!(
        (last.actor.as_str(), last.reason.as_str()),
        ("root", "not this month"),
        "{trail:?}"
    );
}
