//! Partial updates (AIP-134) and capacity at a glance, over real gRPC:
//! an `update_mask` changes only the fields it names, a bad path is a
//! field violation that changes nothing, a mask needs an existing object;
//! a pool shows what is free per class, and `ListPools` filters by GPU
//! model.

#![allow(clippy::unwrap_used)]

use gpualloc_e2e::{Backend, Mesh, admin, fixtures::*};
use gpualloc_proto::resourcepool::v1 as rp;
use prost_types::FieldMask;
use tonic::Code;
use tonic_types::StatusExt;

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

async fn quota(mesh: &Mesh, t: &str) -> rp::TenantQuota {
    mesh.pools()
        .get_tenant_quota(admin(rp::GetTenantQuotaRequest { tenant: t.into() }))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_masked_quota_update_changes_only_what_it_names() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    mesh.pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: "demo".into(),
            limits: Some(rp::Resources {
                cpu_millis: 64_000,
                gpus: 8,
                storage_gib: 10_000,
                ..Default::default()
            }),
            approval_above: Some(gpus(4, "")),
            max_hold: None,
            update_mask: None,
        }))
        .await
        .unwrap();

    // Raise GPUs only: storage, CPU and the approval threshold stay.
    let after = mesh
        .pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: "demo".into(),
            limits: Some(gpus(16, "")),
            update_mask: mask(&["limits.gpus"]),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let limits = after.limits.unwrap();
    assert_eq!(
        (limits.gpus, limits.storage_gib, limits.cpu_millis),
        (16, 10_000, 64_000)
    );
    assert_eq!(after.approval_above.unwrap().gpus, 4);

    // A bad path: INVALID_ARGUMENT naming the path and what is known, and
    // nothing changed.
    let err = mesh
        .pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: "demo".into(),
            limits: Some(gpus(1, "")),
            update_mask: mask(&["limits.gpus", "limits.gpu"]),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let bad = err.get_details_bad_request().unwrap();
    assert_eq!(bad.field_violations.len(), 1, "{bad:?}");
    assert_eq!(bad.field_violations[0].field, "update_mask.paths[1]");
    assert!(
        bad.field_violations[0]
            .description
            .contains("known: cpu_millis"),
        "{bad:?}"
    );
    assert_eq!(quota(&mesh, "demo").await.limits.unwrap().gpus, 16);

    // A mask needs a quota to update.
    let err = mesh
        .pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: "nobody".into(),
            limits: Some(gpus(1, "")),
            update_mask: mask(&["limits"]),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = mesh
        .pools()
        .get_tenant_quota(admin(rp::GetTenantQuotaRequest {
            tenant: "nobody".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "a masked update created a quota"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pools_show_what_is_free_and_filter_by_model() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "a100s", gpu_capacity(&[("A100", 4)])).await;
    put_pool(&mesh, "h100s", gpu_capacity(&[("H100", 2)])).await;
    set_quota(&mesh, "t", gpus(8, "")).await;
    let a = create(&mesh, "t", gpus(4, "A100")).await;
    wait_state(
        &mesh,
        "t",
        &a.allocation_id,
        gpualloc_proto::allocation::v1::State::Allocated,
    )
    .await;

    // A100s are all used: free shows 0 for the model (not an absent key).
    let pool = get_pool(&mesh, "a100s").await;
    let free = pool.free.unwrap();
    assert_eq!(free.gpus_by_model.get("A100"), Some(&0), "{free:?}");
    assert_eq!(free.cpu_millis, 64_000);

    // Masked pool update: storage changed, GPUs and CPU kept.
    let updated = mesh
        .pools()
        .put_pool(admin(rp::PutPoolRequest {
            pool: Some(rp::Pool {
                pool_id: "a100s".into(),
                capacity: Some(rp::Capacity {
                    storage_gib: 42,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["capacity.storage_gib"]),
        }))
        .await
        .unwrap()
        .into_inner();
    let cap = updated.capacity.unwrap();
    assert_eq!(
        (
            cap.storage_gib,
            cap.gpus_by_model.get("A100"),
            cap.cpu_millis
        ),
        (42, Some(&4), 64_000)
    );
    // Output-only fields cannot be masked.
    let err = mesh
        .pools()
        .put_pool(admin(rp::PutPoolRequest {
            pool: Some(rp::Pool {
                pool_id: "a100s".into(),
                ..Default::default()
            }),
            update_mask: mask(&["usage"]),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("output only"), "{}", err.message());

    // The GPU-model filter.
    let list = |model: &str| {
        let mut pools = mesh.pools();
        let model = model.to_owned();
        async move {
            pools
                .list_pools(admin(rp::ListPoolsRequest { gpu_model: model }))
                .await
                .map(|r| {
                    r.into_inner()
                        .pools
                        .into_iter()
                        .map(|p| p.pool_id)
                        .collect::<Vec<_>>()
                })
        }
    };
    assert_eq!(list("H100").await.unwrap(), ["h100s"]);
    assert_eq!(list("").await.unwrap(), ["a100s", "h100s"]);
    assert!(list("B200").await.unwrap().is_empty());
    assert_eq!(
        list("not a model!").await.unwrap_err().code(),
        Code::InvalidArgument
    );
}
