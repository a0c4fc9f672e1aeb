//! Less to type: the body's tenant may be left out (it is then the
//! caller's), an allocation may carry a display name, and the viewer lists
//! by label selector — over real gRPC.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use gpualloc_e2e::{Backend, Mesh, admin, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    resourcepool::v1 as rp,
    viewer::v1 as vpb,
};
use tonic::Code;

fn labelled(name: &str, labels: &[(&str, &str)]) -> apb::CreateAllocationRequest {
    apb::CreateAllocationRequest {
        // No tenant: the caller's own.
        resources: Some(rp::Resources {
            cpu_millis: 1_000,
            ..Default::default()
        }),
        display_name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>()
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

async fn list(
    mesh: &Mesh,
    selector: &str,
    page_size: i32,
    token: &str,
) -> vpb::ListAllocationViewsResponse {
    mesh.viewer()
        .list_allocation_views(tenant(
            "t",
            vpb::ListAllocationViewsRequest {
                label_selector: selector.into(),
                page_size,
                page_token: token.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

fn names(r: &vpb::ListAllocationViewsResponse) -> Vec<String> {
    r.allocations
        .iter()
        .map(|v| v.allocation.as_ref().unwrap().display_name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tenant_defaults_names_show_and_labels_select() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 1)])).await;
    set_quota(
        &mesh,
        "t",
        rp::Resources {
            cpu_millis: 64_000,
            ..Default::default()
        },
    )
    .await;

    // The tenant comes from the token.
    let quota = mesh
        .pools()
        .get_tenant_quota(tenant("t", rp::GetTenantQuotaRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.tenant, "t");
    let check = mesh
        .pools()
        .check_quota(tenant(
            "t",
            rp::CheckQuotaRequest {
                tenant: String::new(),
                resources: Some(rp::Resources {
                    cpu_millis: 1_000,
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.verdict, rp::Verdict::Allowed as i32, "{check:?}");

    let mut ids = Vec::new();
    for (name, labels) in [
        ("run 1", vec![("team", "ml"), ("run", "1")]),
        ("run 7", vec![("team", "ml"), ("run", "7")]),
        ("etl", vec![("team", "data")]),
    ] {
        let a = mesh
            .allocations()
            .create_allocation(tenant("t", labelled(name, &labels)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((a.tenant.as_str(), a.display_name.as_str()), ("t", name));
        ids.push(a.allocation_id);
    }
    for id in &ids {
        wait_view(&mesh, "t", id, State::Allocated).await;
    }

    // An administrator has no tenant of its own: it must name one.
    let err = mesh
        .allocations()
        .create_allocation(admin(labelled("x", &[])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("tenant"), "{}", err.message());
    // A display name is for people: bounded.
    let err = mesh
        .allocations()
        .create_allocation(tenant("t", labelled(&"n".repeat(129), &[])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Label selectors, AND of every pair.
    let mut ml = names(&list(&mesh, "team=ml", 0, "").await);
    ml.sort();
    assert_eq!(ml, ["run 1", "run 7"]);
    assert_eq!(
        names(&list(&mesh, "team=ml, run=7", 0, "").await),
        ["run 7"]
    );
    assert!(names(&list(&mesh, "team=nobody", 0, "").await).is_empty());
    assert_eq!(names(&list(&mesh, "", 0, "").await).len(), 3);
    // Paging through a selection: one per page, nothing twice.
    let first = list(&mesh, "team=ml", 1, "").await;
    assert_eq!(first.allocations.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second = list(&mesh, "team=ml", 1, &first.next_page_token).await;
    let mut both = [names(&first), names(&second)].concat();
    both.sort();
    assert_eq!(both, ["run 1", "run 7"]);
    let third = list(&mesh, "team=ml", 1, &second.next_page_token).await;
    assert!(second.next_page_token.is_empty() || third.allocations.is_empty());
    // A selector that is not key=value is refused.
    let err = mesh
        .viewer()
        .list_allocation_views(tenant(
            "t",
            vpb::ListAllocationViewsRequest {
                label_selector: "team".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
