//! The failover transport against real tonic servers on loopback: one
//! healthy, one refusing connections, one answering UNAVAILABLE, one
//! answering a final error.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use gpualloc_client::{Failover, Policy};
use tokio::net::TcpListener;
use tonic::{Code, Status, transport::Server};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A health server on a free port whose every call is counted, then
/// answered by the health service or refused with `refuse`.
async fn server(refuse: Option<Code>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let intercepted = tonic::service::interceptor::InterceptedService::new(
        service,
        move |req: tonic::Request<()>| {
            counted.fetch_add(1, Ordering::SeqCst);
            match refuse {
                Some(code) => Err(Status::new(code, "refused by the test")),
                None => Ok(req),
            }
        },
    );
    tokio::spawn(async move {
        let _reporter = reporter;
        Server::builder()
            .add_service(intercepted)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (url, calls)
}

/// A URL nothing listens on.
async fn dead() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

fn client(urls: &[&String]) -> HealthClient<Failover> {
    let failover = Failover::new(urls.iter().map(|u| (*u).clone()), Policy::default(), |e| {
        Ok(e.connect_timeout(std::time::Duration::from_secs(1)))
    })
    .unwrap();
    HealthClient::new(failover)
}

async fn check(c: &mut HealthClient<Failover>) -> Result<(), Status> {
    c.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .map(|_| ())
}

#[tokio::test]
async fn calls_alternate_between_replicas() {
    let (a, a_calls) = server(None).await;
    let (b, b_calls) = server(None).await;
    let mut c = client(&[&a, &b]);
    for _ in 0..10 {
        check(&mut c).await.unwrap();
    }
    assert_eq!(a_calls.load(Ordering::SeqCst), 5);
    assert_eq!(b_calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_replica_that_is_down_costs_no_call() {
    let down = dead().await;
    let (up, up_calls) = server(None).await;
    let mut c = client(&[&down, &up]);
    for _ in 0..10 {
        check(&mut c).await.unwrap();
    }
    assert_eq!(up_calls.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn unavailable_goes_to_another_replica_and_other_errors_do_not() {
    let (draining, draining_calls) = server(Some(Code::Unavailable)).await;
    let (up, up_calls) = server(None).await;
    let mut c = client(&[&draining, &up]);
    for _ in 0..6 {
        check(&mut c).await.unwrap();
    }
    assert_eq!(up_calls.load(Ordering::SeqCst), 6);
    // Ejected after its first refusal: tried last, so not again here.
    assert_eq!(draining_calls.load(Ordering::SeqCst), 1);

    let (refusing, refusing_calls) = server(Some(Code::FailedPrecondition)).await;
    let (other, other_calls) = server(None).await;
    let mut c = client(&[&refusing, &other]);
    let err = check(&mut c).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(refusing_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        other_calls.load(Ordering::SeqCst),
        0,
        "a final answer is not retried"
    );
}

#[tokio::test]
async fn when_every_replica_is_down_the_caller_sees_unavailable() {
    let (a, b) = (dead().await, dead().await);
    let mut c = client(&[&a, &b]);
    let started = std::time::Instant::now();
    let err = check(&mut c).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Three rounds with 100 + 200 ms between them, then the error.
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
}
