//! What a grpcurl user sees, with the real grpcurl (1.8.6, reflection
//! v1alpha only): every error detail gpualloc sends — BadRequest,
//! ErrorInfo, QuotaFailure, PreconditionFailure, RetryInfo — decodes
//! through the services' reflection instead of printing "is not
//! recognized"; refusals name what is wrong in words a user can act on;
//! and a partial update written the way the README writes it (a JSON field
//! mask) changes only what it names.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use gpualloc_e2e::{Backend, Mesh, Service, Svc, Tuning, fixtures::*};
use gpualloc_proto::allocation::v1::State;
use gpualloc_testkit::auth;

/// Runs grpcurl against `service` with `token`; returns its exit success
/// and everything it printed.
fn grpcurl(service: &Service, token: &str, body: &str, method: &str) -> (bool, String) {
    let out = Command::new(gpualloc_testkit::grpcurl())
        .args(["-plaintext", "-H"])
        .arg(format!("authorization: Bearer {token}"))
        .args(["-d", body])
        .arg(service.addr.to_string())
        .arg(method)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A failed call whose output names the detail type and decodes it.
fn assert_detail(out: &(bool, String), code: &str, detail: &str, field: &str) {
    let (ok, text) = out;
    assert!(!ok, "the call succeeded:\n{text}");
    assert!(
        text.contains(&format!("Code: {code}")),
        "not {code}:\n{text}"
    );
    assert!(
        text.contains(&format!("type.googleapis.com/google.rpc.{detail}")),
        "no {detail}:\n{text}"
    );
    assert!(
        !text.contains("is not recognized"),
        "grpcurl could not decode a detail:\n{text}"
    );
    assert!(text.contains(field), "{detail} without {field:?}:\n{text}");
}

const CREATE: &str = "gpualloc.allocation.v1.AllocationService/CreateAllocation";
const SET_QUOTA: &str = "gpualloc.resourcepool.v1.ResourcePoolService/SetTenantQuota";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_detail_reads_in_grpcurl() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota(&mesh, "demo", gpus(2, "")).await;
    let demo = auth::tenant_token("demo");
    let admin = auth::admin_token();

    // BadRequest: nothing asked for.
    let out = grpcurl(
        &mesh.allocation,
        &demo,
        r#"{"tenant":"demo","resources":{}}"#,
        CREATE,
    );
    assert_detail(&out, "InvalidArgument", "BadRequest", "fieldViolations");

    // QuotaFailure and ErrorInfo: over the quota.
    let out = grpcurl(
        &mesh.allocation,
        &demo,
        r#"{"tenant":"demo","resources":{"gpus":3,"gpu_model":"A100"}}"#,
        CREATE,
    );
    assert_detail(
        &out,
        "FailedPrecondition",
        "QuotaFailure",
        "\"subject\":\"gpus\"",
    );
    assert_detail(
        &out,
        "FailedPrecondition",
        "ErrorInfo",
        "\"reason\":\"EXCEEDS_QUOTA\"",
    );
    assert!(!out.1.contains("over quota: over quota"), "{}", out.1);

    // Readable refusals: a model no pool has, a case slip, a class the
    // quota does not grant.
    let refusal = |body: &str| grpcurl(&mesh.allocation, &demo, body, CREATE).1;
    let text = refusal(r#"{"tenant":"demo","resources":{"gpus":1,"gpu_model":"B200"}}"#);
    assert!(
        text.contains(r#"no pool has GPU model "B200"; known: A100"#),
        "{text}"
    );
    let text = refusal(r#"{"tenant":"demo","resources":{"gpus":1,"gpu_model":"a100"}}"#);
    assert!(text.contains(r#"did you mean "A100""#), "{text}");
    let text = refusal(r#"{"tenant":"demo","resources":{"storage_gib":500}}"#);
    assert!(text.contains("quota has no storage_gib"), "{text}");
    assert!(!text.contains("0 of 0"), "{text}");

    // PreconditionFailure: a quota lowered below what the tenant holds.
    let a = create(&mesh, "demo", gpus(2, "A100")).await;
    wait_state(&mesh, "demo", &a.allocation_id, State::Allocated).await;
    let out = grpcurl(
        &mesh.pool,
        &admin,
        r#"{"tenant":"demo","limits":{"gpus":1}}"#,
        SET_QUOTA,
    );
    assert_detail(
        &out,
        "FailedPrecondition",
        "PreconditionFailure",
        "\"type\":\"QUOTA_BELOW_USAGE\"",
    );

    // A partial update as the README writes it (grpcurl 1.8.6 takes a
    // field mask as {"paths": [...]}, not the canonical JSON string). Only
    // the GPUs change.
    let (ok, text) = grpcurl(
        &mesh.pool,
        &admin,
        r#"{"tenant":"demo","limits":{"gpus":3,"storage_gib":7},"update_mask":{"paths":["limits.gpus"]}}"#,
        SET_QUOTA,
    );
    assert!(ok, "{text}");
    let quota: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(quota["limits"]["gpus"], 3, "{text}");
    assert!(quota["limits"].get("storageGib").is_none(), "{text}");

    // RetryInfo: a tenant over its request rate.
    mesh.allocation.stop().await;
    let mut common = mesh.allocation.common.clone();
    common.tenant_rate_limit = 0.01;
    common.tenant_burst = 1;
    let pool_url = mesh.pool.url();
    mesh.allocation =
        Service::spawn_tuned(Svc::Allocation, common, pool_url, None, Tuning::default()).await;
    mesh.allocation.wait_serving().await;
    let body = r#"{"tenant":"demo","resources":{"cpu_millis":1}}"#;
    let mut out = grpcurl(&mesh.allocation, &demo, body, CREATE);
    for _ in 0..3 {
        if out.1.contains("ResourceExhausted") {
            break;
        }
        out = grpcurl(&mesh.allocation, &demo, body, CREATE);
    }
    assert_detail(&out, "ResourceExhausted", "RetryInfo", "retryDelay");
}
