//! The authorization matrix, generated: every RPC of the three services
//! (listed from the compiled descriptor set) is called with no token, with
//! tenant A's token acting on A, with A's token acting on B, and with an
//! administrator's token, against the running services; each outcome must
//! be the one docs/security.md documents. The table in that document is
//! the expectation, so the document and the services cannot drift apart,
//! and a new RPC without a row (or a row without an RPC) fails the test.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use bytes::Bytes;
use gpualloc_e2e::{Backend, Mesh, admin, fixtures::*, raw};
use gpualloc_proto::{allocation::v1 as apb, resourcepool::v1 as rp, viewer::v1 as vpb};
use prost::Message;
use tonic::{Code, transport::Channel};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Nobody,
    OwnTenant,
    OtherTenant,
    Admin,
}

const A: &str = "team-a";
const B: &str = "team-b";

/// The documented table: path -> outcome per caller.
fn documented() -> BTreeMap<String, [Code; 4]> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/security.md"),
    )
    .unwrap();
    let start = doc.find("<!-- authz-matrix:begin -->").unwrap();
    let end = doc.find("<!-- authz-matrix:end -->").unwrap();
    let code = |s: &str| -> Code {
        match s.trim() {
            "OK" => Code::Ok,
            "UNAUTHENTICATED" => Code::Unauthenticated,
            "PERMISSION_DENIED" => Code::PermissionDenied,
            "NOT_FOUND" => Code::NotFound,
            "INVALID_ARGUMENT" => Code::InvalidArgument,
            "FAILED_PRECONDITION" => Code::FailedPrecondition,
            other => panic!("unknown code {other:?} in docs/security.md"),
        }
    };
    doc[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').collect();
            let path = format!("/{}", cells[0].trim().trim_matches('`'));
            (
                path,
                [
                    code(cells[1]),
                    code(cells[2]),
                    code(cells[3]),
                    code(cells[4]),
                ],
            )
        })
        .collect()
}

struct World {
    mesh: Mesh,
    /// One allocation per tenant, projected by the viewer.
    allocation: BTreeMap<&'static str, String>,
}

impl World {
    async fn create_for(&self, t: &str, n: i32) -> apb::Allocation {
        self.mesh
            .allocations()
            .create_allocation(admin(apb::CreateAllocationRequest {
                tenant: t.into(),
                resources: Some(gpus(n, "A100")),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
    }

    /// The request of `path` acting on tenant `target`. Objects a call
    /// changes are made fresh for it.
    async fn request(&self, path: &str, target: &'static str) -> Bytes {
        let method = path.rsplit('/').next().unwrap();
        let id = || self.allocation[target].clone();
        let unique = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let bytes = match method {
            "CreateAllocation" => apb::CreateAllocationRequest {
                tenant: target.into(),
                resources: Some(gpus(1, "A100")),
                ..Default::default()
            }
            .encode_to_vec(),
            "GetAllocation" => apb::GetAllocationRequest {
                allocation_id: id(),
            }
            .encode_to_vec(),
            "CancelAllocation" => apb::CancelAllocationRequest {
                allocation_id: self.create_for(target, 1).await.allocation_id,
                reason: String::new(),
            }
            .encode_to_vec(),
            "RenewAllocation" => {
                let leased = self
                    .mesh
                    .allocations()
                    .create_allocation(admin(apb::CreateAllocationRequest {
                        tenant: target.into(),
                        resources: Some(gpus(1, "A100")),
                        lease: Some(prost_types::Duration {
                            seconds: 3600,
                            nanos: 0,
                        }),
                        ..Default::default()
                    }))
                    .await
                    .unwrap()
                    .into_inner();
                wait_view(
                    &self.mesh,
                    target,
                    &leased.allocation_id,
                    apb::State::Allocated,
                )
                .await;
                apb::RenewAllocationRequest {
                    allocation_id: leased.allocation_id,
                    lease: Some(prost_types::Duration {
                        seconds: 7200,
                        nanos: 0,
                    }),
                }
                .encode_to_vec()
            }
            "ApproveAllocation" | "RejectAllocation" => {
                let awaiting = self.create_for(target, 5).await;
                assert_eq!(awaiting.state, apb::State::AwaitingApproval as i32);
                apb::ApproveAllocationRequest {
                    allocation_id: awaiting.allocation_id,
                }
                .encode_to_vec()
            }
            "CheckQuota" => rp::CheckQuotaRequest {
                tenant: target.into(),
                resources: Some(gpus(1, "A100")),
            }
            .encode_to_vec(),
            "PutPool" => rp::PutPoolRequest {
                update_mask: None,
                pool: Some(rp::Pool {
                    pool_id: format!("new-{unique}"),
                    capacity: Some(gpu_capacity(&[("A100", 1)])),
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
            "GetPool" => rp::GetPoolRequest {
                pool_id: "p".into(),
            }
            .encode_to_vec(),
            "ListPools" => rp::ListPoolsRequest::default().encode_to_vec(),
            "DeletePool" => {
                let pool_id = format!("idle-{unique}");
                put_pool(&self.mesh, &pool_id, gpu_capacity(&[("A100", 1)])).await;
                rp::DeletePoolRequest { pool_id }.encode_to_vec()
            }
            "SetTenantQuota" => quota_request(target).encode_to_vec(),
            "GetTenantQuota" => rp::GetTenantQuotaRequest {
                tenant: target.into(),
            }
            .encode_to_vec(),
            "ListHeld" => rp::ListHeldRequest {
                pool_id: String::new(),
                tenant: target.into(),
            }
            .encode_to_vec(),
            "GetAllocationView" => vpb::GetAllocationViewRequest {
                allocation_id: id(),
            }
            .encode_to_vec(),
            "ListAllocationViews" => vpb::ListAllocationViewsRequest {
                tenant: target.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            "WatchAllocations" => vpb::WatchAllocationsRequest {
                tenant: target.into(),
                allocation_id: String::new(),
                resume_versions: Default::default(),
            }
            .encode_to_vec(),
            "ListAllocationHistory" => vpb::ListAllocationHistoryRequest {
                allocation_id: id(),
            }
            .encode_to_vec(),
            "GetTenantSummary" => vpb::GetTenantSummaryRequest {
                tenant: target.into(),
            }
            .encode_to_vec(),
            "GetUsageReport" => vpb::GetUsageReportRequest {
                tenant: target.into(),
                month: "2026-11".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            other => panic!("the matrix test has no request for {other}: add one"),
        };
        bytes.into()
    }

    fn channel(&self, path: &str) -> Channel {
        if path.starts_with("/gpualloc.allocation.") {
            self.mesh.allocation.channel()
        } else if path.starts_with("/gpualloc.resourcepool.") {
            self.mesh.pool.channel()
        } else {
            self.mesh.viewer.channel()
        }
    }
}

fn quota_request(t: &str) -> rp::SetTenantQuotaRequest {
    rp::SetTenantQuotaRequest {
        tenant: t.into(),
        limits: Some(gpus(100, "")),
        approval_above: Some(gpus(4, "")),
        ..Default::default()
    }
}

async fn call(channel: Channel, path: &str, body: Bytes, who: Who) -> Code {
    let token = match who {
        Who::Nobody => None,
        Who::OwnTenant | Who::OtherTenant => Some(gpualloc_testkit::auth::tenant_token(A)),
        Who::Admin => Some(gpualloc_testkit::auth::admin_token()),
    };
    raw::call(channel, path, body, token.as_deref()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_answers_every_caller_as_documented_on_sqlite() {
    matrix(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_answers_every_caller_as_documented_on_postgres() {
    matrix(Backend::Postgres).await;
}

async fn matrix(backend: Backend) {
    let expected = documented();
    let rpcs = raw::public_methods();
    let undocumented: Vec<&String> = rpcs.iter().filter(|p| !expected.contains_key(*p)).collect();
    assert!(
        undocumented.is_empty(),
        "RPCs without a row in docs/security.md's authorization matrix: {undocumented:?}"
    );
    let stale: Vec<&String> = expected.keys().filter(|p| !rpcs.contains(p)).collect();
    assert!(
        stale.is_empty(),
        "matrix rows for RPCs that do not exist: {stale:?}"
    );

    let mesh = Mesh::start(backend).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 100)])).await;
    for t in [A, B] {
        mesh.pools()
            .set_tenant_quota(admin(quota_request(t)))
            .await
            .unwrap();
    }
    let mut world = World {
        mesh,
        allocation: BTreeMap::new(),
    };
    for t in [A, B] {
        let a = world.create_for(t, 1).await;
        wait_view(&world.mesh, t, &a.allocation_id, apb::State::Allocated).await;
        world.allocation.insert(t, a.allocation_id);
    }

    let mut wrong = Vec::new();
    let mut calls = 0;
    for path in &rpcs {
        let want = expected[path];
        for (who, target) in [
            (Who::Nobody, A),
            (Who::OwnTenant, A),
            (Who::OtherTenant, B),
            (Who::Admin, B),
        ] {
            let body = world.request(path, target).await;
            let got = call(world.channel(path), path, body, who).await;
            calls += 1;
            if got != want[who as usize] {
                wrong.push(format!(
                    "{path} as {who:?}: got {got:?}, documented {:?}",
                    want[who as usize]
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "undocumented outcomes:\n{}",
        wrong.join("\n")
    );
    assert_eq!(calls, rpcs.len() * 4);
    eprintln!(
        "authorization matrix: {} RPCs x 4 callers = {calls} calls",
        rpcs.len()
    );
}
