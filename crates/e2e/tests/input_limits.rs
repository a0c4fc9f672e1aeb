//! What a caller sends cannot grow what the services keep or say: a
//! scan of made-up method paths is counted under one `unknown` label, and
//! an error repeats at most 128 characters of the input it refuses.

#![allow(clippy::unwrap_used)]

use gpualloc_e2e::{Backend, Mesh, raw, tenant};
use gpualloc_proto::allocation::v1 as apb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn made_up_methods_share_one_metrics_label() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    let token = gpualloc_testkit::auth::admin_token();
    for i in 0..20 {
        let path = format!("/gpualloc.scan{i}.v1.Probe/Method{i}");
        let code = raw::call(mesh.pool.channel(), &path, Default::default(), Some(&token)).await;
        assert_eq!(code, Code::Unimplemented, "{path}");
    }
    let text = gpualloc_telemetry::METRICS.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("gpualloc_rpc_requests_total{")
                && l.contains("method=\"unknown\"")),
        "no `unknown` method label:\n{text}"
    );
    assert!(!text.contains("scan7"), "a made-up path became a label");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_repeat_at_most_a_little_of_the_input() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    let huge = "x".repeat(100_000);
    let e = mesh
        .allocations()
        .create_allocation(tenant(
            "team-a",
            apb::CreateAllocationRequest {
                tenant: huge.clone(),
                request_id: huge,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().len() < 1_200,
        "{} bytes of message",
        e.message().len()
    );
    assert!(e.message().contains("(100000 bytes)"), "{}", e.message());
    let details = tonic_types::StatusExt::get_error_details(&e);
    let bad = details.bad_request().expect("field violations");
    assert!(bad.field_violations.iter().any(|v| v.field == "tenant"));
    assert!(
        bad.field_violations
            .iter()
            .all(|v| v.description.len() < 600)
    );
}
