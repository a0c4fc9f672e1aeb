//! The test NATS servers refuse anonymous clients and let each user in
//! with its password only.

use gpualloc_testkit::{NatsServer, nats_connect_as};

#[tokio::test]
async fn users_connect_and_strangers_do_not() {
    let server = NatsServer::start();
    let anonymous = async_nats::connect(server.url().as_str()).await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    for user in ["allocation", "resource-pool", "viewer", "operator"] {
        let c = nats_connect_as(&server.url(), user).await;
        assert!(c.is_ok(), "{user}: {c:?}");
    }
    let wrong =
        async_nats::ConnectOptions::with_user_and_password("operator".into(), "guess".into())
            .connect(server.url().as_str())
            .await;
    assert!(wrong.is_err());
}
