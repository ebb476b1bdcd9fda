//! `portswitch cert`: a development certificate authority and certificates signed by
//! it, for trying TLS and mutual TLS. Production deployments should use their own PKI.
//!
//! A directory that already holds a CA (`ca.pem` and `ca-key.pem`, as an earlier run
//! wrote them) gets the certificates still missing — client certificates for more
//! users, say — signed by that CA, which is left as it is: what trusts `ca.pem`
//! already trusts them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio_rustls::rustls;

use crate::AppResult;

#[derive(Args, Debug)]
pub struct CertArgs {
    /// Directory to write into (created if missing). Existing files are never
    /// overwritten: a directory holding a CA from an earlier run (ca.pem and
    /// ca-key.pem) keeps it, and its server certificate, and gets the client
    /// certificates asked for, signed by that CA.
    #[arg(long, default_value = "portswitch-certs")]
    out: PathBuf,
    /// DNS names and IP addresses the server certificate is valid for (repeatable;
    /// for a new server certificate only).
    #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    hosts: Vec<String>,
    /// Users to make client certificates for (mutual TLS; repeatable). The
    /// certificate's common name is the user name.
    #[arg(long = "client")]
    clients: Vec<String>,
}

/// The development CA's common name: a CA rebuilt from its key must have the same
/// name as the one written, or what it signs would not chain to it.
const CA_NAME: &str = "portswitch development CA";

/// Writes a file that must not exist yet: private keys 0600, certificates 0644,
/// durably (a crash leaves no half-written key).
fn write_new(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    let mode = if private {
        portswitch_files::SECRET_MODE
    } else {
        portswitch_files::PUBLIC_MODE
    };
    Ok(portswitch_files::write_new_durable(
        path,
        text.as_bytes(),
        mode,
    )?)
}

/// The CA's parameters, the same every run (only the key differs between CAs).
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, CA_NAME);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// Whether both files of a certificate and its key exist (`false` if neither does;
/// an error naming them if only one does: which half is lost cannot be guessed).
fn pair_exists(dir: &Path, cert: &str, key: &str) -> Result<bool, String> {
    match (dir.join(cert).exists(), dir.join(key).exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (has_cert, _) => {
            let (there, missing) = if has_cert { (cert, key) } else { (key, cert) };
            Err(format!(
                "{} exists but {missing} does not: move it away or restore {missing}; \
                 nothing written",
                dir.join(there).display()
            ))
        }
    }
}

/// The CA of an earlier run, from its key: the same name and key as the `ca.pem`
/// written then, so that what it signs verifies against that file.
fn existing_ca(
    dir: &Path,
) -> Result<(KeyPair, Certificate), Box<dyn std::error::Error + Send + Sync>> {
    let path = dir.join("ca-key.pem");
    // Refused if group or others may read it, as every secret this program wrote.
    let mut pem = portswitch_files::read_secret(&path)?;
    let key = std::str::from_utf8(&pem)
        .map_err(|_| "not PEM text".to_string())
        .and_then(|text| KeyPair::from_pem(text).map_err(|e| e.to_string()));
    // Do not leave the key's text in freed memory.
    pem.fill(0);
    std::hint::black_box(&pem);
    let key = key.map_err(|e| format!("{}: {e}", path.display()))?;
    let ca = ca_params()?.self_signed(&key)?;
    Ok((key, ca))
}

/// Checks that certificates signed by a CA rebuilt from `ca-key.pem` verify against
/// the `ca.pem` beside it (as a server given `--tls-client-ca ca.pem` checks them):
/// a key that is not that certificate's, or a `ca.pem` made otherwise, is found
/// before anything is written.
fn verify_against(ca_pem: &Path, certs: &[&Certificate]) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in portswitch_files::load_roots(ca_pem).map_err(|e| e.to_string())? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", ca_pem.display()))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("{}: {e}", ca_pem.display()))?;
    let now = rustls_pki_types::UnixTime::now();
    for cert in certs {
        verifier
            .verify_client_cert(cert.der(), &[], now)
            .map_err(|e| {
                format!(
                    "a certificate signed with ca-key.pem does not verify against {} ({e}): \
                     the key is not that certificate's, or it was not made by portswitch \
                     cert; nothing written",
                    ca_pem.display()
                )
            })?;
    }
    Ok(())
}

pub fn run(args: CertArgs) -> AppResult {
    let dir = &args.out;
    // Refuse before writing anything: a new CA beside an old server certificate
    // would be a set that does not fit together, and no file is ever replaced.
    for (i, user) in args.clients.iter().enumerate() {
        if user.is_empty() || user.contains(['/', '\0']) {
            return Err(
                format!("--client {user:?}: a user name here is part of a file name").into(),
            );
        }
        if args.clients[..i].contains(user) {
            return Err(format!("--client {user} is given twice").into());
        }
    }
    std::fs::create_dir_all(dir)?;
    let has_ca = pair_exists(dir, "ca.pem", "ca-key.pem")?;
    let has_server = pair_exists(dir, "server.pem", "server-key.pem")?;
    if has_server && !has_ca {
        return Err(format!(
            "{} exists but the CA that signed it does not (ca.pem, ca-key.pem): \
             nothing written",
            dir.join("server.pem").display()
        )
        .into());
    }
    for user in &args.clients {
        for name in [
            format!("client-{user}.pem"),
            format!("client-{user}-key.pem"),
        ] {
            let path = dir.join(name);
            if path.exists() {
                return Err(format!("{} exists: nothing written", path.display()).into());
            }
        }
    }
    if has_server && args.clients.is_empty() {
        return Err(format!(
            "{} already holds a CA and a server certificate: nothing written (add client \
             certificates with --client NAME)",
            dir.display()
        )
        .into());
    }

    let (ca_key, ca_cert) = if has_ca {
        existing_ca(dir)?
    } else {
        let key = KeyPair::generate()?;
        let ca = ca_params()?.self_signed(&key)?;
        (key, ca)
    };
    // Everything is made before anything is written: (file name, text, private).
    let mut files: Vec<(String, String, bool)> = Vec::new();
    let mut signed: Vec<Certificate> = Vec::new();
    if !has_ca {
        files.push(("ca.pem".into(), ca_cert.pem(), false));
        files.push(("ca-key.pem".into(), ca_key.serialize_pem(), true));
    }
    if !has_server {
        let key = KeyPair::generate()?;
        let mut server = CertificateParams::new(Vec::<String>::new())?;
        server.distinguished_name.push(
            DnType::CommonName,
            args.hosts.first().map_or("localhost", String::as_str),
        );
        for h in &args.hosts {
            server
                .subject_alt_names
                .push(match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(h.clone().try_into()?),
                });
        }
        // Client use too, so that members of a group can present it on peer links
        // (mutual TLS: each member is the client of the others' connections).
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = server.signed_by(&key, &ca_cert, &ca_key)?;
        files.push(("server.pem".into(), cert.pem(), false));
        files.push(("server-key.pem".into(), key.serialize_pem(), true));
        signed.push(cert);
    }
    for user in &args.clients {
        let key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, user.as_str());
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = client.signed_by(&key, &ca_cert, &ca_key)?;
        files.push((format!("client-{user}.pem"), cert.pem(), false));
        files.push((format!("client-{user}-key.pem"), key.serialize_pem(), true));
        signed.push(cert);
    }
    if has_ca {
        verify_against(&dir.join("ca.pem"), &signed.iter().collect::<Vec<_>>())?;
    }
    for (name, text, private) in &files {
        write_new(&dir.join(name), text, *private)?;
    }
    let names: Vec<&str> = files.iter().map(|(n, ..)| n.as_str()).collect();
    println!(
        "wrote {} to {}{}",
        names.join(", "),
        dir.display(),
        match (has_ca, has_server) {
            (false, _) => "",
            (true, false) => " (signed by the CA there)",
            (true, true) => " (signed by the CA there; server.pem kept)",
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn args(out: &Path, clients: &[&str]) -> CertArgs {
        CertArgs {
            out: out.to_path_buf(),
            hosts: vec!["localhost".into()],
            clients: clients.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn mode(path: PathBuf) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keys_are_private_certificates_public_and_nothing_is_overwritten() {
        let out = std::env::temp_dir().join(format!("portswitch-cert-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        run(args(&out, &["alice"])).unwrap();
        for key in ["ca-key.pem", "server-key.pem", "client-alice-key.pem"] {
            assert_eq!(mode(out.join(key)), 0o600, "{key}");
        }
        for cert in ["ca.pem", "server.pem", "client-alice.pem"] {
            let m = mode(out.join(cert));
            assert_eq!(m & 0o077 & !0o044, 0, "{cert}");
            assert_ne!(m & 0o400, 0, "{cert}");
        }
        // What it wrote loads as what it is.
        assert_eq!(
            portswitch_files::load_certs(&out.join("server.pem"))
                .unwrap()
                .len(),
            1
        );
        portswitch_files::load_key(&out.join("server-key.pem")).unwrap();
        // A client whose files exist (even one of them) is refused before anything
        // is written.
        let ca = std::fs::read(out.join("ca.pem")).unwrap();
        std::fs::remove_file(out.join("client-alice-key.pem")).unwrap();
        let err = run(args(&out, &["bob", "alice"])).unwrap_err();
        assert!(err.to_string().contains("client-alice.pem exists"), "{err}");
        assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca);
        assert!(!out.join("client-alice-key.pem").exists());
        assert!(!out.join("client-bob.pem").exists());
        // Nothing new asked for: said so.
        let err = run(args(&out, &[])).unwrap_err();
        assert!(err.to_string().contains("--client NAME"), "{err}");
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn a_directory_with_a_ca_gets_client_certificates_from_it() {
        let out =
            std::env::temp_dir().join(format!("portswitch-cert-unit-add-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        run(args(&out, &[])).unwrap();
        let read = |n: &str| std::fs::read(out.join(n)).unwrap();
        let before: Vec<Vec<u8>> = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"]
            .iter()
            .map(|n| read(n))
            .collect();
        run(args(&out, &["alice", "bob"])).unwrap();
        let after: Vec<Vec<u8>> = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"]
            .iter()
            .map(|n| read(n))
            .collect();
        assert_eq!(before, after, "the CA and the server certificate are kept");
        for user in ["alice", "bob"] {
            assert_eq!(mode(out.join(format!("client-{user}-key.pem"))), 0o600);
            let cert = portswitch_files::load_certs(&out.join(format!("client-{user}.pem")))
                .unwrap()
                .remove(0);
            let roots = portswitch_files::load_roots(&out.join("ca.pem")).unwrap();
            let mut store = rustls::RootCertStore::empty();
            store.add(roots[0].clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(store),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            verifier
                .verify_client_cert(&cert, &[], rustls_pki_types::UnixTime::now())
                .unwrap();
        }

        // Half a pair is refused, whichever half.
        std::fs::rename(out.join("server-key.pem"), out.join("kept")).unwrap();
        let err = run(args(&out, &["carol"])).unwrap_err().to_string();
        assert!(
            err.contains("server.pem exists but server-key.pem does not"),
            "{err}"
        );
        std::fs::rename(out.join("kept"), out.join("server-key.pem")).unwrap();
        // A CA key that is not ca.pem's: found before anything is written.
        std::fs::remove_file(out.join("ca-key.pem")).unwrap();
        write_new(
            &out.join("ca-key.pem"),
            &KeyPair::generate().unwrap().serialize_pem(),
            true,
        )
        .unwrap();
        let err = run(args(&out, &["carol"])).unwrap_err().to_string();
        assert!(err.contains("does not verify against"), "{err}");
        assert!(!out.join("client-carol.pem").exists());
        // A CA key others may read is refused, as every secret written 0600.
        std::fs::set_permissions(
            out.join("ca-key.pem"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = run(args(&out, &["carol"])).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        // A server certificate without its CA: a new CA would not fit it.
        for n in ["ca.pem", "ca-key.pem"] {
            std::fs::remove_file(out.join(n)).unwrap();
        }
        let err = run(args(&out, &["carol"])).unwrap_err().to_string();
        assert!(err.contains("the CA that signed it does not"), "{err}");
        assert!(!out.join("ca.pem").exists());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
