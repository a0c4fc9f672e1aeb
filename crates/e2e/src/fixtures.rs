//! Small helpers the end-to-end tests share.

use std::{collections::BTreeMap, time::Duration};

use diesel::{QueryableByName, RunQueryDsl, sql_query, sql_types::BigInt};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    resourcepool::v1 as rp,
    viewer::v1 as vpb,
};
use gpualloc_storage::{Db, DbError, DbOptions};
use gpualloc_testkit::{TestDb, eventually};

use crate::{Mesh, admin, tenant};

/// How long a saga may take to settle in these tests.
pub const SETTLE: Duration = Duration::from_secs(20);

pub fn gpus(n: i32, model: &str) -> rp::Resources {
    rp::Resources {
        gpus: n,
        gpu_model: model.into(),
        ..Default::default()
    }
}

pub fn custom(class: &str, n: i64) -> rp::Resources {
    rp::Resources {
        custom: BTreeMap::from([(class.to_owned(), n)]),
        ..Default::default()
    }
}

pub async fn put_pool(mesh: &Mesh, id: &str, capacity: rp::Capacity) -> rp::Pool {
    mesh.pools()
        .put_pool(admin(rp::PutPoolRequest {
            pool: Some(rp::Pool {
                pool_id: id.into(),
                capacity: Some(capacity),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner()
}

pub fn gpu_capacity(models: &[(&str, i32)]) -> rp::Capacity {
    rp::Capacity {
        cpu_millis: 64_000,
        memory_mib: 512 * 1024,
        storage_gib: 10_000,
        gpus_by_model: models.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect(),
        custom: BTreeMap::new(),
    }
}

pub async fn set_quota(mesh: &Mesh, t: &str, limits: rp::Resources) -> rp::TenantQuota {
    mesh.pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: t.into(),
            limits: Some(limits),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

pub async fn create(mesh: &Mesh, t: &str, resources: rp::Resources) -> apb::Allocation {
    mesh.allocations()
        .create_allocation(tenant(
            t,
            apb::CreateAllocationRequest {
                tenant: t.into(),
                resources: Some(resources),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Polls GetAllocation until the allocation is in `state`.
pub async fn wait_state(mesh: &Mesh, t: &str, id: &str, state: State) -> apb::Allocation {
    eventually(SETTLE, &format!("{id} {state:?} in allocation"), || async {
        let a = mesh
            .allocations()
            .get_allocation(tenant(
                t,
                apb::GetAllocationRequest {
                    allocation_id: id.into(),
                },
            ))
            .await
            .ok()?
            .into_inner();
        (a.state == state as i32).then_some(a)
    })
    .await
}

/// Polls GetAllocationView until the view shows `state`.
pub async fn wait_view(mesh: &Mesh, t: &str, id: &str, state: State) -> vpb::AllocationView {
    eventually(SETTLE, &format!("{id} {state:?} in the viewer"), || async {
        let v = mesh
            .viewer()
            .get_allocation_view(tenant(
                t,
                vpb::GetAllocationViewRequest {
                    allocation_id: id.into(),
                },
            ))
            .await
            .ok()?
            .into_inner();
        (v.allocation.as_ref()?.state == state as i32).then_some(v)
    })
    .await
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Runs `SELECT COUNT(*) AS n …` on a service's database.
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    let handle = Db::connect(
        &db.url,
        DbOptions {
            pool_size: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let sql = sql.to_owned();
    handle
        .read(move |c| Ok::<_, DbError>(sql_query(sql.clone()).get_result::<Count>(c)?.n))
        .await
        .unwrap()
}
