//! SIGTERM under load, as clients see it: the allocation service stops
//! taking new RPCs, finishes the ones in flight, stops its consumer and
//! flushes its outbox, then exits. Every create a client saw succeed is
//! stored and its saga completes after the restart; the only errors
//! clients see are refusals of requests that never reached a handler
//! (retried with the same request id), never an in-flight RPC cut off.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use gpualloc_e2e::{
    Svc,
    cluster::{Cluster, pg_count, rows},
    fixtures::*,
    tenant,
};
use gpualloc_proto::allocation::v1 as apb;
use gpualloc_testkit::eventually;
use tonic::Code;

/// What clients saw.
#[derive(Debug, Default)]
struct Seen {
    acked: Vec<String>,
    refused: Vec<String>,
    /// Transport errors of unclear cause: (request id, when, status). The
    /// request is retried with its key; afterwards the test checks that
    /// the server had not stored it before the error (which would mean an
    /// RPC cut off after it was processed).
    unclear: Vec<(String, i64, String)>,
    wrong: Vec<String>,
}

/// An error that shows the request never reached a handler: the
/// connection was refused, or the server refused the stream (HTTP/2
/// REFUSED_STREAM after GOAWAY).
fn never_processed(s: &tonic::Status) -> bool {
    let text = format!("{} {:?}", s.message(), s);
    s.code() == Code::Unavailable
        && [
            "tcp connect error",
            "Connection refused",
            "refused stream",
            "REFUSED_STREAM",
        ]
        .iter()
        .any(|m| text.contains(m))
}

/// An error of the connection rather than an answer of the server: most
/// arrive as CANCELLED, UNAVAILABLE or UNKNOWN, but a stream refused by the
/// server's GOAWAY arrives as INTERNAL (see `status::from_transport`).
fn transport_failure(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Cancelled | Code::Unavailable | Code::Unknown
    ) || gpualloc_platform::status::from_transport(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_finishes_in_flight_rpcs_and_loses_nothing() {
    let mut cluster = Cluster::start(env!("CARGO_BIN_EXE_mesh-node"), 1).await;
    cluster
        .put_pool("p", gpu_capacity(&[("A100", 100_000)]))
        .await;
    cluster.set_quota("team", gpus(100_000, "")).await;

    let client = cluster.allocations().remove(0);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (client, stop, started) = (client.clone(), stop.clone(), started.clone());
            tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    started.fetch_add(1, Ordering::SeqCst);
                    let request = apb::CreateAllocationRequest {
                        tenant: "team".into(),
                        resources: Some(gpus(1, "A100")),
                        request_id: format!("w{w}-{n}"),
                        ..Default::default()
                    };
                    // Retried with the same key until it is answered.
                    loop {
                        match client
                            .clone()
                            .create_allocation(tenant("team", request.clone()))
                            .await
                        {
                            Ok(a) => {
                                seen.acked.push(a.into_inner().allocation_id);
                                break;
                            }
                            Err(s) if never_processed(&s) => {
                                seen.refused.push(s.message().to_owned());
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(s) if transport_failure(&s) => {
                                let when = gpualloc_domain::time::now_micros();
                                seen.unclear.push((
                                    request.request_id.clone(),
                                    when,
                                    format!("{s:?}"),
                                ));
                            }
                            Err(s) => {
                                seen.wrong.push(format!("{s:?}"));
                                break;
                            }
                        }
                    }
                }
                seen
            })
        })
        .collect();

    // Load is flowing; then SIGTERM while requests are in flight.
    eventually(Duration::from_secs(30), "load running", || async {
        (started.load(Ordering::SeqCst) > 200).then_some(())
    })
    .await;
    let node = cluster.node(Svc::Allocation, 0);
    let status = node.terminate().await.unwrap();
    assert!(
        status.success(),
        "the service did not exit cleanly: {status:?}"
    );
    // Down for a moment under load, then back.
    let before_restart = started.load(Ordering::SeqCst);
    node.start();
    cluster.wait_serving().await;
    eventually(
        Duration::from_secs(30),
        "load after the restart",
        || async { (started.load(Ordering::SeqCst) > before_restart + 200).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut all = Seen::default();
    for w in workers {
        let s = w.await.unwrap();
        all.acked.extend(s.acked);
        all.refused.extend(s.refused);
        all.unclear.extend(s.unclear);
        all.wrong.extend(s.wrong);
    }
    eprintln!(
        "{} creates acknowledged, {} refusals before processing and {} transport errors (all retried)",
        all.acked.len(),
        all.refused.len(),
        all.unclear.len()
    );
    assert!(all.wrong.is_empty(), "{:#?}", all.wrong);
    // A transport error is fine for a request the server never started on
    // (the client had queued it on a closing connection); it is a cut-off
    // RPC if the server had stored it before the client gave up.
    for (request_id, when, status) in &all.unclear {
        let stored_before = pg_count(
            &cluster.allocation_db.url,
            &format!(
                "SELECT COUNT(*) AS n FROM allocations WHERE request_id = '{request_id}' AND create_time < {when}"
            ),
        )
        .await;
        assert_eq!(
            stored_before, 0,
            "an in-flight RPC was cut off: {request_id}: {status}"
        );
    }
    assert!(
        !all.refused.is_empty(),
        "the restart was not noticed; the test tests nothing"
    );

    // Everything acknowledged is stored and its saga completes.
    eventually(
        Duration::from_secs(60),
        "every acknowledged saga completed",
        || async {
            let stored = rows(
                &cluster.allocation_db.url,
                "SELECT allocation_id AS id, state, version FROM allocations",
            )
            .await;
            let states: std::collections::BTreeMap<String, String> =
                stored.into_iter().map(|r| (r.id, r.state)).collect();
            all.acked
                .iter()
                .all(|id| states.get(id).is_some_and(|s| s == "ALLOCATED"))
                .then_some(())
        },
    )
    .await;
    // Its log shows the ordered shutdown.
    let logs = cluster.log_tails(400);
    for step in [
        "draining in-flight RPCs",
        "RPCs drained",
        "outbox flushed on shutdown",
    ] {
        assert!(logs.contains(step), "no {step:?} in the logs:\n{logs}");
    }
}
