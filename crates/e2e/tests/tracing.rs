//! One trace across the whole saga, as Jaeger would show it: the three
//! services run as real processes exporting OTLP to a receiver inside the
//! test. An allocation created with a W3C `traceparent` yields spans from
//! all three services in that trace, each NATS hop joining the consumer's
//! span to the producer's; a request carrying only Envoy's B3 headers joins
//! its trace the same way.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use gpualloc_e2e::{cluster::Cluster, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    viewer::v1 as vpb,
};
use gpualloc_testkit::eventually;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::span::SpanKind,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, metadata::MetadataValue};

const DEADLINE: Duration = Duration::from_secs(60);

/// A span as received, with the name of the service that sent it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name,
                        kind: s.kind,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn receiver() -> (Receiver, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let r = Receiver::default();
    let service = TraceServiceServer::new(r.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (r, url)
}

const SERVICES: [&str; 3] = [
    "gpualloc-allocation",
    "gpualloc-resource-pool",
    "gpualloc-viewer",
];

/// Waits until the trace holds the spans a saga to ALLOCATED makes, and
/// returns them.
async fn trace_of(r: &Receiver, trace_id: &str) -> Vec<Got> {
    eventually(
        DEADLINE,
        &format!("spans of trace {trace_id} from all services"),
        || async {
            let spans: Vec<Got> =
                r.0.lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect();
            // Spans arrive in export batches, per process and out of
            // order: wait for every hop. Each service consumed something
            // (the pool the request, the allocation service the grant),
            // and the viewer all four events: both state changes, the
            // request and the grant.
            let consumed = |service: &str| {
                spans
                    .iter()
                    .filter(|s| s.service == service && s.kind == SpanKind::Consumer as i32)
                    .count()
            };
            // And the producer span each consumer hangs off, which the
            // publishing process may export after the consumer's.
            let parents_in = spans
                .iter()
                .filter(|s| s.kind == SpanKind::Consumer as i32)
                .all(|c| spans.iter().any(|p| p.span_id == c.parent));
            (SERVICES.iter().all(|s| consumed(s) >= 1)
                && consumed("gpualloc-viewer") >= 4
                && parents_in)
                .then_some(spans)
        },
    )
    .await
}

/// Every consumer span is a child of a producer span of the same trace:
/// the hop over NATS does not break the trace.
fn assert_hops_join(spans: &[Got]) {
    let by_id: BTreeMap<&str, &Got> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let consumers: Vec<&Got> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Consumer as i32)
        .collect();
    assert!(consumers.len() >= 3, "{spans:#?}");
    for c in consumers {
        let parent = by_id.get(c.parent.as_str()).unwrap_or_else(|| {
            panic!("consumer span {c:?} has no parent in the trace: {spans:#?}")
        });
        assert_eq!(
            parent.kind,
            SpanKind::Producer as i32,
            "{c:?} <- {parent:?}"
        );
    }
    // And every producer span hangs off the RPC or consumer that wrote
    // the event.
    for p in spans.iter().filter(|s| s.kind == SpanKind::Producer as i32) {
        let parent = by_id
            .get(p.parent.as_str())
            .unwrap_or_else(|| panic!("producer span {p:?} has no parent: {spans:#?}"));
        assert!(
            parent.kind == SpanKind::Server as i32 || parent.kind == SpanKind::Consumer as i32,
            "{p:?} <- {parent:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_spans_the_saga_across_all_three_services() {
    let (spans, url) = receiver().await;
    let cluster = Cluster::start_with_env(
        env!("CARGO_BIN_EXE_mesh-node"),
        1,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("GPUALLOC_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,gpualloc_allocation=debug"),
        ],
    )
    .await;
    let mut allocations = cluster.allocations().remove(0);
    let viewers = cluster.viewers().remove(0);
    cluster.put_pool("p", gpu_capacity(&[("A100", 8)])).await;
    cluster.set_quota("team", gpus(8, "")).await;

    let create = |headers: Vec<(&'static str, String)>| {
        let mut r = tenant(
            "team",
            apb::CreateAllocationRequest {
                tenant: "team".into(),
                resources: Some(gpus(1, "A100")),
                ..Default::default()
            },
        );
        for (k, v) in headers {
            r.metadata_mut()
                .insert(k, MetadataValue::try_from(v.as_str()).unwrap());
        }
        r
    };
    let wait_allocated = |id: String| {
        let viewers = viewers.clone();
        async move {
            eventually(DEADLINE, "allocated in the viewer", || {
                let id = id.clone();
                let mut v = viewers.clone();
                async move {
                    let view = v
                        .get_allocation_view(tenant(
                            "team",
                            vpb::GetAllocationViewRequest { allocation_id: id },
                        ))
                        .await
                        .ok()?
                        .into_inner();
                    (view.allocation?.state == State::Allocated as i32).then_some(())
                }
            })
            .await;
        }
    };

    // W3C: the caller's span is the parent of the allocation service's.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let a = allocations
        .create_allocation(create(vec![
            ("traceparent", format!("00-{trace_id}-{caller_span}-01")),
            ("x-request-id", "req-w3c".into()),
        ]))
        .await
        .unwrap()
        .into_inner();
    wait_allocated(a.allocation_id.clone()).await;
    let w3c = trace_of(&spans, trace_id).await;
    let root = w3c
        .iter()
        .find(|s| s.service == "gpualloc-allocation" && s.kind == SpanKind::Server as i32)
        .unwrap_or_else(|| panic!("no server span: {w3c:#?}"));
    assert_eq!(root.parent, caller_span);
    assert_eq!(
        root.name,
        "gpualloc.allocation.v1.AllocationService/CreateAllocation"
    );
    // The synchronous CheckQuota: client span in the allocation service,
    // server span in the pool, parent and child.
    let client = w3c
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap_or_else(|| panic!("no client span: {w3c:#?}"));
    assert!(w3c.iter().any(|s| s.service == "gpualloc-resource-pool"
        && s.kind == SpanKind::Server as i32
        && s.parent == client.span_id));
    assert_hops_join(&w3c);

    // B3 only, as Envoy sends it: the same, in the B3 trace.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let b = allocations
        .create_allocation(create(vec![
            ("x-b3-traceid", b3_trace.into()),
            ("x-b3-spanid", "e457b5a2e4d86bd1".into()),
            ("x-b3-sampled", "1".into()),
            ("x-request-id", "req-b3".into()),
        ]))
        .await
        .unwrap()
        .into_inner();
    wait_allocated(b.allocation_id.clone()).await;
    let b3 = trace_of(&spans, b3_trace).await;
    let root = b3
        .iter()
        .find(|s| s.service == "gpualloc-allocation" && s.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(root.parent, "e457b5a2e4d86bd1");
    assert_hops_join(&b3);

    // Logs lead to the trace: the allocation service's JSON log lines
    // inside the request carry its trace id and request id.
    let logs = std::fs::read_to_string(cluster.log_dir().join("allocation-0.log")).unwrap();
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["allocation_id"] == a.allocation_id.as_str())
        .unwrap_or_else(|| panic!("no log line of {}:\n{logs}", a.allocation_id));
    assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
    assert_eq!(line["span"]["request_id"], "req-w3c", "{line}");
    assert!(
        line["span"]["span_id"]
            .as_str()
            .is_some_and(|s| s.len() == 16),
        "{line}"
    );
    drop(cluster);
}
