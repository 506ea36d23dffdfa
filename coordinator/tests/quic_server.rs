//! The coordinator's QUIC server against raw clients: real QUIC on 127.0.0.1, real certificates.
//! Identity comes from the client certificate; bad input fails one stream and nothing else.

#![allow(clippy::unwrap_used)]

mod quic_support;

use edgecard_coordinator::pki::CertificateAuthority;
use edgecard_protocol::SyncErrorCode;
use quic_support::*;

#[tokio::test]
async fn a_valid_node_uploads_and_gets_its_high_water_mark() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let eu = node("eu-1");
    let client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("eu-1"));
    let connection = connect(&client, server.addr).await.unwrap();
    match exchange(&connection, &upload_bytes(&eu, 1..=3)).await {
        Exchange::Acked(ack) => assert_eq!(ack.events_high_water, 3),
        other => panic!("expected an ack, got {other:?}"),
    }
    // The same batch again: skipped by seq, acked again, stored once.
    match exchange(&connection, &upload_bytes(&eu, 1..=3)).await {
        Exchange::Acked(ack) => assert_eq!(ack.events_high_water, 3),
        other => panic!("expected an ack, got {other:?}"),
    }
    server.ledger.with(&eu, |l| {
        assert_eq!(l.events.len(), 3);
        assert_eq!(l.skipped, 3);
        assert_eq!(l.duplicates, 0);
    });
    assert_eq!(server.metrics.uploads.get(), 2);
    assert_eq!(server.metrics.connections_accepted.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_cannot_connect() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let rogue_ca = CertificateAuthority::generate("rogue").unwrap();
    let rogue = rogue_ca.issue_node(&node("eu-1")).unwrap();
    // The rogue client trusts the real CA (it can see the server is genuine) but holds a
    // certificate the coordinator's CA never issued.
    let client = raw_client(&pki.ca.cert_pem(), &rogue);
    let refused = match connect(&client, server.addr).await {
        Err(_) => true,
        Ok(connection) => matches!(exchange(&connection, &upload_bytes(&node("eu-1"), 1..=1)).await, Exchange::Lost(_)),
    };
    assert!(refused, "a foreign certificate got through");
    assert_eq!(server.ledger.event_count(&node("eu-1")), 0);
    eventually("refusal counted", || server.metrics.connections_refused.get() == 1).await;
    assert_eq!(server.metrics.connections_accepted.get(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_server_certificate_is_no_client_certificate() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    // Issued by the right CA, but for server auth only.
    let client = raw_client(&pki.ca.cert_pem(), &pki.server);
    let refused = match connect(&client, server.addr).await {
        Err(_) => true,
        Ok(connection) => matches!(exchange(&connection, &upload_bytes(&node("eu-1"), 1..=1)).await, Exchange::Lost(_)),
    };
    assert!(refused);
    assert_eq!(server.metrics.uploads.get(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_node_cannot_connect() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let eu = node("eu-1");
    server.ledger.revoke(&eu);
    let client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("eu-1"));
    let lost = match connect(&client, server.addr).await {
        Err(e) => e,
        Ok(connection) => match exchange(&connection, &upload_bytes(&eu, 1..=1)).await {
            Exchange::Lost(e) => e,
            other => panic!("revoked node got {other:?}"),
        },
    };
    assert_eq!(application_code(&lost), Some(SyncErrorCode::Revoked), "{lost}");
    assert_eq!(server.ledger.event_count(&eu), 0);

    // Another node is unaffected.
    let us = node("us-1");
    let other = raw_client(&pki.ca.cert_pem(), &pki.node_cert("us-1"));
    let connection = connect(&other, server.addr).await.unwrap();
    assert!(matches!(exchange(&connection, &upload_bytes(&us, 1..=1)).await, Exchange::Acked(_)));
    server.stop().await;
}

#[tokio::test]
async fn a_node_revoked_while_connected_is_cut_off_at_its_next_upload() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let eu = node("eu-1");
    let client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("eu-1"));
    let connection = connect(&client, server.addr).await.unwrap();
    assert!(matches!(exchange(&connection, &upload_bytes(&eu, 1..=1)).await, Exchange::Acked(_)));
    server.ledger.revoke(&eu);
    match exchange(&connection, &upload_bytes(&eu, 2..=2)).await {
        Exchange::Lost(e) => assert_eq!(application_code(&e), Some(SyncErrorCode::Revoked)),
        other => panic!("revoked node got {other:?}"),
    }
    assert_eq!(server.ledger.event_count(&eu), 1);
    server.stop().await;
}

#[tokio::test]
async fn an_upload_for_another_node_resets_the_stream_only() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let (eu, us) = (node("eu-1"), node("us-1"));
    let client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("eu-1"));
    let connection = connect(&client, server.addr).await.unwrap();
    match exchange(&connection, &upload_bytes(&us, 1..=2)).await {
        Exchange::Reset(code) => assert_eq!(code, Some(SyncErrorCode::WrongNode)),
        other => panic!("impersonation got {other:?}"),
    }
    assert_eq!(server.ledger.event_count(&us), 0, "nothing recorded for the impersonated node");
    // The connection still works for the node's own uploads.
    assert!(matches!(exchange(&connection, &upload_bytes(&eu, 1..=1)).await, Exchange::Acked(_)));
    assert_eq!(server.ledger.event_count(&eu), 1);
    server.stop().await;
}

#[tokio::test]
async fn bad_bytes_reset_one_stream_and_everything_else_keeps_working() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let (eu, us) = (node("eu-1"), node("us-1"));
    let eu_client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("eu-1"));
    let us_client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("us-1"));
    let eu_conn = connect(&eu_client, server.addr).await.unwrap();
    let us_conn = connect(&us_client, server.addr).await.unwrap();

    let mut garbage: Vec<Vec<u8>> =
        vec![Vec::new(), b"random bytes that are not a frame".to_vec(), b"EDGC".to_vec(), vec![0xff; 4096]];
    // A valid frame with a flipped byte, and a frame truncated.
    let mut flipped = upload_bytes(&eu, 1..=2);
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    garbage.push(flipped);
    let valid = upload_bytes(&eu, 1..=2);
    garbage.push(valid[..valid.len() / 2].to_vec());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for len in [1usize, 15, 16, 17, 100, 1000] {
        let mut bytes = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push(seed as u8);
        }
        garbage.push(bytes);
    }

    // Bad streams on one connection, good uploads interleaved on the same connection and on
    // another node's connection, all concurrently.
    let mut tasks = Vec::new();
    for bytes in garbage.clone() {
        let connection = eu_conn.clone();
        tasks.push(tokio::spawn(async move { exchange(&connection, &bytes).await }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(bounded("garbage exchange", task).await.unwrap());
    }
    for (i, result) in results.iter().enumerate() {
        assert!(matches!(result, Exchange::Reset(Some(SyncErrorCode::Malformed))), "garbage #{i}: {result:?}");
    }
    let (eu_upload, us_upload) = (upload_bytes(&eu, 1..=2), upload_bytes(&us, 1..=5));
    let (same, other) = tokio::join!(exchange(&eu_conn, &eu_upload), exchange(&us_conn, &us_upload));
    assert!(matches!(same, Exchange::Acked(ref a) if a.events_high_water == 2), "{same:?}");
    assert!(matches!(other, Exchange::Acked(ref a) if a.events_high_water == 5), "{other:?}");
    assert_eq!(server.ledger.event_count(&eu), 2);
    assert_eq!(server.ledger.event_count(&us), 5);
    assert!(eu_conn.close_reason().is_none(), "the connection survived");
    assert_eq!(server.metrics.stream_failures.get(), garbage.len() as u64);
    server.stop().await;
}

#[tokio::test]
async fn a_handler_error_resets_the_stream_with_its_code() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let eu = node("eu-1");
    server.ledger.fail_after_commit.store(1, std::sync::atomic::Ordering::SeqCst);
    let client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("eu-1"));
    let connection = connect(&client, server.addr).await.unwrap();
    match exchange(&connection, &upload_bytes(&eu, 1..=3)).await {
        Exchange::Reset(code) => assert_eq!(code, Some(SyncErrorCode::Unavailable)),
        other => panic!("expected a reset, got {other:?}"),
    }
    // Re-sent after the "crash": skipped, acked, stored once.
    assert!(
        matches!(exchange(&connection, &upload_bytes(&eu, 1..=3)).await, Exchange::Acked(ref a) if a.events_high_water == 3)
    );
    server.ledger.with(&eu, |l| assert_eq!((l.events.len(), l.skipped, l.duplicates), (3, 3, 0)));
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_with_a_code() {
    let pki = TestPki::new();
    let server = TestServer::start(&pki).await;
    let client = raw_client(&pki.ca.cert_pem(), &pki.node_cert("eu-1"));
    let connection = connect(&client, server.addr).await.unwrap();
    assert!(matches!(exchange(&connection, &upload_bytes(&node("eu-1"), 1..=1)).await, Exchange::Acked(_)));
    server.stop().await;
    let reason = bounded("close", connection.closed()).await;
    assert_eq!(application_code(&reason), Some(SyncErrorCode::ShuttingDown), "{reason}");
}
