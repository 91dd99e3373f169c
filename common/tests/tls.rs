//! Mutual TLS on a real gRPC server over a real socket: a client with a
//! certificate from the CA gets in; a client without a certificate, with
//! one from another CA, or without TLS at all is refused; and a client
//! refuses a server whose certificate is not from its CA.

mod pki;

use std::time::Duration;

use pki::Ca;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use weft_common::{
    client::{lazy_channel, lazy_channel_tls},
    grpc::GrpcServer,
    tls::TlsConfig,
};

/// A health check through `channel`: Ok when SERVING, else what failed.
async fn check(channel: tonic::transport::Channel) -> Result<(), String> {
    let mut health = HealthClient::new(channel);
    let call = health.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(Ok(r)) => Err(format!("status {:?}", r.get_ref().status)),
    }
}

async fn serve(tls: TlsConfig) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let token = CancellationToken::new();
    tokio::spawn(
        GrpcServer::new()
            .tls(Some(tls))
            .serve_tcp(listener, token.clone()),
    );
    (format!("http://{addr}"), token)
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_ca_get_in() {
    let ca = Ca::new("weft test CA");
    let other = Ca::new("another CA");
    let server = ca.leaf("svc-watcher", &["localhost", "127.0.0.1"]);
    let (target, token) = serve(server.tls()).await;

    let mut outcomes = Vec::new();
    let good = ca.leaf("datapath-svc", &["node1"]);
    let ok = check(lazy_channel_tls(&target, Some(&good.tls())).expect("channel")).await;
    outcomes.push(format!("certificate from the CA: {ok:?}"));
    assert_eq!(ok, Ok(()), "a client with a valid certificate gets in");

    let https = target.replace("http://", "https://");
    let no_cert = Endpoint::from_shared(https.clone())
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem())))
        .expect("tls")
        .connect_lazy();
    let refused = check(no_cert).await;
    outcomes.push(format!("no client certificate: {refused:?}"));
    assert!(
        refused.is_err(),
        "a client without a certificate is refused"
    );

    let stranger = other.leaf("intruder", &["intruder"]);
    let stranger_trusting_ours =
        TlsConfig::from_pem(stranger.cert.clone(), stranger.key.clone(), ca.pem());
    let refused =
        check(lazy_channel_tls(&target, Some(&stranger_trusting_ours)).expect("channel")).await;
    outcomes.push(format!("certificate from another CA: {refused:?}"));
    assert!(
        refused.is_err(),
        "a client with a certificate from another CA is refused"
    );

    let refused = check(lazy_channel(&target).expect("channel")).await;
    outcomes.push(format!("plaintext: {refused:?}"));
    assert!(refused.is_err(), "plaintext is refused");

    // The other direction: a client that trusts only another CA refuses
    // this server, even with a certificate the server would accept.
    let wary = TlsConfig::from_pem(good.cert.clone(), good.key.clone(), other.pem());
    let refused = check(lazy_channel_tls(&target, Some(&wary)).expect("channel")).await;
    outcomes.push(format!("server not from the client's CA: {refused:?}"));
    assert!(refused.is_err(), "a server from another CA is refused");

    // The refusals did not hurt the server.
    let ok = check(lazy_channel_tls(&target, Some(&good.tls())).expect("channel")).await;
    assert_eq!(ok, Ok(()), "still serving valid clients");
    println!("{}", outcomes.join("\n"));
    token.cancel();
}

#[tokio::test]
async fn a_server_name_override_verifies_certificates_with_dns_names_only() {
    let ca = Ca::new("weft test CA");
    let server = ca.leaf("ipam-svc", &["ipam.weft.svc"]);
    let (target, token) = serve(server.tls()).await;
    let client = ca.leaf("datapath-svc", &["node1"]);
    let by_address = check(lazy_channel_tls(&target, Some(&client.tls())).expect("channel")).await;
    assert!(
        by_address.is_err(),
        "127.0.0.1 is not in the certificate: {by_address:?}"
    );
    let named = client
        .tls()
        .with_server_name(Some("ipam.weft.svc".to_string()));
    let ok = check(lazy_channel_tls(&target, Some(&named)).expect("channel")).await;
    assert_eq!(ok, Ok(()), "with --tls-server-name the name matches");
    token.cancel();
}
