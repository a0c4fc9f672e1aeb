//! For deployments without a mesh: the gRPC servers speak TLS (mutual TLS
//! with a client CA), the allocation service reaches the resource pool
//! over it, and the services reach NATS over TLS with client
//! certificates. Certificates come from a throwaway CA made here.

#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, time::Duration};

use gpualloc_e2e::{
    Service, Svc, admin, common_config,
    fixtures::{gpu_capacity, gpus, put_pool_at, set_quota_at},
    tenant,
};
use gpualloc_proto::{
    allocation::v1::{self as apb, allocation_service_client::AllocationServiceClient},
    resourcepool::v1::{self as rp, resource_pool_service_client::ResourcePoolServiceClient},
};
use gpualloc_testkit::{NatsServer, TestDb, unique_name};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a certificate for localhost/127.0.0.1 and a client one.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["gpualloc-allocation".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    async fn channel(
        &self,
        port: u16,
        client_cert: bool,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("localhost");
        if client_cert {
            tls = tls.identity(Identity::from_pem(
                self.read("client.pem"),
                self.read("client.key"),
            ));
        }
        Endpoint::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_and_nats_over_mutual_tls() {
    let pki = Pki::new();
    // NATS that takes only TLS clients with a certificate of our CA.
    let nats = NatsServer::start_with_tls(gpualloc_nats_acl::ServerTls {
        cert_file: pki.path("server.pem").display().to_string(),
        key_file: pki.path("server.key").display().to_string(),
        client_ca_file: Some(pki.path("ca.pem").display().to_string()),
    });
    let (stream, prefix) = (unique_name("S").to_uppercase(), unique_name("s"));
    let with_tls = |db: &TestDb| {
        let mut c = common_config(&db.url, &nats.url()).with_stream(&stream, &prefix);
        c.tls_cert = Some(pki.path("server.pem"));
        c.tls_key = Some(pki.path("server.key"));
        c.tls_client_ca = Some(pki.path("ca.pem"));
        c.nats_tls_ca = Some(pki.path("ca.pem"));
        c.nats_tls_cert = Some(pki.path("client.pem"));
        c.nats_tls_key = Some(pki.path("client.key"));
        c.nats_tls_required = true;
        c
    };
    let (pool_db, alloc_db) = (TestDb::sqlite(), TestDb::sqlite());
    let pool = Service::spawn(Svc::ResourcePool, with_tls(&pool_db), String::new(), None).await;
    // The allocation service's own client of the pool, over mutual TLS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let alloc_port = listener.local_addr().unwrap().port();
    let mut ac = gpualloc_allocation::Config::new(
        Svc::Allocation.with_nats_user(with_tls(&alloc_db)),
        format!("https://localhost:{}", pool.addr.port()),
    );
    ac.resource_pool_tls_ca = Some(pki.path("ca.pem"));
    ac.resource_pool_tls_cert = Some(pki.path("client.pem"));
    ac.resource_pool_tls_key = Some(pki.path("client.key"));
    let allocation = tokio::spawn(gpualloc_allocation::run(
        ac,
        listener,
        std::future::pending(),
    ));

    // Health over mutual TLS: both serve, so both reached NATS over TLS.
    let pool_channel = pki.channel(pool.addr.port(), true).await.unwrap();
    for port in [pool.addr.port(), alloc_port] {
        gpualloc_testkit::eventually(Duration::from_secs(30), "SERVING over TLS", || async {
            let channel = pki.channel(port, true).await.ok()?;
            let r = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .ok()?;
            (r.into_inner().status == 1).then_some(())
        })
        .await;
    }
    let pools = ResourcePoolServiceClient::new(pool_channel);
    put_pool_at(pools.clone(), "p", gpu_capacity(&[("A100", 2)])).await;
    set_quota_at(pools, "team-a", gpus(2, "")).await;
    // An over-quota create is refused: CheckQuota answered over TLS (an
    // unreachable pool would have let it through as PENDING).
    let mut allocations =
        AllocationServiceClient::new(pki.channel(alloc_port, true).await.unwrap());
    let e = allocations
        .create_allocation(tenant(
            "team-a",
            apb::CreateAllocationRequest {
                tenant: "team-a".into(),
                resources: Some(gpus(3, "A100")),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // Without a client certificate, or without TLS, nothing gets through.
    let no_cert = match pki.channel(pool.addr.port(), false).await {
        Err(_) => true,
        Ok(c) => ResourcePoolServiceClient::new(c)
            .list_pools(admin(rp::ListPoolsRequest::default()))
            .await
            .is_err(),
    };
    assert!(no_cert, "a client without a certificate was served");
    let plain = ResourcePoolServiceClient::new(pool.channel())
        .list_pools(admin(rp::ListPoolsRequest::default()))
        .await;
    assert!(plain.is_err(), "a plaintext client was served");
    // NATS refuses a client without TLS.
    let plain_nats = gpualloc_testkit::nats_connect_as(&nats.url(), "operator").await;
    assert!(plain_nats.is_err(), "NATS served a plaintext client");
    allocation.abort();
}
