//! Peer links with mutual TLS: a group whose members hold certificates from one peer
//! CA elects a master; a connection without a certificate, with one from another CA,
//! or in plain TCP gets no answer from a member.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portswitch_cluster::{ClusterConfig, ClusterNode, Member, PeerTlsSettings, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A CA and one member certificate (valid for 127.0.0.1, server and client use)
/// written to `dir`.
fn make_pki(dir: &Path, name: &str) -> PeerTlsSettings {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} peer CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut member = CertificateParams::new(Vec::<String>::new()).unwrap();
    member
        .distinguished_name
        .push(DnType::CommonName, format!("{name} member"));
    member.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    member.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = member.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let s = PeerTlsSettings {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: dir.join(format!("{name}-ca.pem")),
    };
    std::fs::write(&s.cert, cert.pem()).unwrap();
    std::fs::write(&s.key, key.serialize_pem()).unwrap();
    std::fs::write(&s.ca, ca_cert.pem()).unwrap();
    s
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ps-peer-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A length-prefixed vote request, as a member would send it (plain bytes).
fn vote_frame() -> Vec<u8> {
    let body = br#"{"to":1,"body":{"Vote":{"vote":{"leader_id":{"term":99,"node_id":7},"committed":false},"last_log_id":null}}}"#;
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Whether a member answers the vote request (a length-prefixed JSON frame) on this
/// stream within a second. A TLS alert is not an answer.
async fn answers<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> bool {
    if s.write_all(&vote_frame()).await.is_err() {
        return false;
    }
    let read = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let len = u32::from_be_bytes(len) as usize;
        if len > 1 << 20 {
            return None;
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        serde_json::from_slice::<serde_json::Value>(&body).ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), read).await,
        Ok(Some(v)) if v.get("Vote").is_some()
    )
}

async fn tls_client(
    trust: &PeerTlsSettings,
    present: Option<&PeerTlsSettings>,
    addr: &str,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&trust.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match present {
        Some(p) => {
            let certs = CertificateDer::pem_file_iter(&p.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&p.key).unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_the_peer_ca_elect_and_strangers_get_no_answer() {
    let dir = tempdir("group");
    let good = make_pki(&dir, "good");
    let other = make_pki(&dir, "other");
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        members.insert(
            id,
            Member {
                peer_addr: l.local_addr().unwrap().to_string(),
                client_addr: format!("client-{id}"),
            },
        );
        listeners.push(l);
    }
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let mut cfg = ClusterConfig::new(id, members.clone(), dir.join(id.to_string()), 10_000);
        cfg.peer_tls = Some(good.clone());
        nodes.push(ClusterNode::start(cfg, l).await.unwrap());
    }
    // The links work: one member becomes master, the others follow it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let master = loop {
        let roles: Vec<Role> = nodes.iter().map(|n| n.role().borrow().clone()).collect();
        let masters: Vec<usize> = (0..3)
            .filter(|&i| matches!(roles[i], Role::Master(_)))
            .collect();
        assert!(masters.len() <= 1, "two masters: {roles:?}");
        let following = roles
            .iter()
            .filter(|r| matches!(r, Role::Follower { master: Some(_) }))
            .count();
        if masters.len() == 1 && following == 2 {
            break masters[0];
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no master over TLS: {roles:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let term = nodes[master].status().term;
    let addr = members[&1].peer_addr.clone();

    // A peer with a certificate from the peer CA is answered (the control case).
    let mut ok = tls_client(&good, Some(&good), &addr)
        .await
        .expect("handshake");
    assert!(
        answers(&mut ok).await,
        "a member with the peer CA's certificate got no answer"
    );
    // No certificate, a certificate from another CA, plain TCP: nothing.
    if let Some(mut s) = tls_client(&good, None, &addr).await {
        assert!(
            !answers(&mut s).await,
            "answered a peer without a certificate"
        );
    }
    if let Some(mut s) = tls_client(&good, Some(&other), &addr).await {
        assert!(
            !answers(&mut s).await,
            "answered a certificate from another CA"
        );
    }
    let mut plain = TcpStream::connect(&addr).await.unwrap();
    assert!(!answers(&mut plain).await, "answered plain TCP");
    // And the group carried on undisturbed (the vote for term 99 never landed).
    assert!(nodes[master].status().term < 99);
    assert_eq!(nodes[master].status().term, term);
    for n in nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn bad_peer_tls_files_are_refused_with_the_file_named() {
    let dir = tempdir("bad");
    let good = make_pki(&dir, "good");
    let missing = PeerTlsSettings {
        cert: dir.join("nope.pem"),
        ..good.clone()
    };
    let e = portswitch_cluster::PeerTls::load(&missing).unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    let empty_ca = dir.join("empty.pem");
    std::fs::write(&empty_ca, "").unwrap();
    let e = portswitch_cluster::PeerTls::load(&PeerTlsSettings {
        ca: empty_ca,
        ..good.clone()
    })
    .unwrap_err();
    assert!(e.to_string().contains("empty.pem"), "{e}");
    assert!(portswitch_cluster::PeerTls::load(&good).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}
