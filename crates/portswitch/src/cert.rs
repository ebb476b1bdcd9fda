//! `portswitch cert`: a development certificate authority and certificates signed by
//! it, for trying TLS and mutual TLS. Production deployments should use their own PKI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::AppResult;

#[derive(Args, Debug)]
pub struct CertArgs {
    /// Directory to write into (created if missing; existing files are not
    /// overwritten).
    #[arg(long, default_value = "portswitch-certs")]
    out: PathBuf,
    /// DNS names and IP addresses the server certificate is valid for (repeatable).
    #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    hosts: Vec<String>,
    /// Users to make client certificates for (mutual TLS; repeatable). The
    /// certificate's common name is the user name.
    #[arg(long = "client")]
    clients: Vec<String>,
}

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

pub fn run(args: CertArgs) -> AppResult {
    std::fs::create_dir_all(&args.out)?;
    // Refuse before writing anything: a new CA beside an old server certificate
    // would be a set that does not fit together.
    let mut names = vec![
        "ca.pem".to_string(),
        "ca-key.pem".to_string(),
        "server.pem".to_string(),
        "server-key.pem".to_string(),
    ];
    for user in &args.clients {
        names.push(format!("client-{user}.pem"));
        names.push(format!("client-{user}-key.pem"));
    }
    if let Some(path) = names.iter().map(|n| args.out.join(n)).find(|p| p.exists()) {
        return Err(format!("{} exists: nothing written", path.display()).into());
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "portswitch development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    write_new(&args.out.join("ca.pem"), &ca_cert.pem(), false)?;
    write_new(&args.out.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;

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
    write_new(&args.out.join("server.pem"), &cert.pem(), false)?;
    write_new(&args.out.join("server-key.pem"), &key.serialize_pem(), true)?;

    for user in &args.clients {
        let key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, user.as_str());
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = client.signed_by(&key, &ca_cert, &ca_key)?;
        write_new(
            &args.out.join(format!("client-{user}.pem")),
            &cert.pem(),
            false,
        )?;
        write_new(
            &args.out.join(format!("client-{user}-key.pem")),
            &key.serialize_pem(),
            true,
        )?;
    }
    println!(
        "wrote ca.pem, server.pem, server-key.pem{} to {}",
        if args.clients.is_empty() {
            ""
        } else {
            " and client certificates"
        },
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_private_certificates_public_and_nothing_is_overwritten() {
        let out = std::env::temp_dir().join(format!("portswitch-cert-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let args = || CertArgs {
            out: out.clone(),
            hosts: vec!["localhost".into()],
            clients: vec!["alice".into()],
        };
        run(args()).unwrap();
        let mode = |n: &str| std::fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o777;
        for key in ["ca-key.pem", "server-key.pem", "client-alice-key.pem"] {
            assert_eq!(mode(key), 0o600, "{key}");
        }
        for cert in ["ca.pem", "server.pem", "client-alice.pem"] {
            assert_eq!(mode(cert) & 0o077 & !0o044, 0, "{cert}");
            assert_ne!(mode(cert) & 0o400, 0, "{cert}");
        }
        // What it wrote loads as what it is.
        assert_eq!(
            portswitch_files::load_certs(&out.join("server.pem"))
                .unwrap()
                .len(),
            1
        );
        portswitch_files::load_key(&out.join("server-key.pem")).unwrap();
        // A second run refuses before writing anything, even a file that is missing.
        let ca = std::fs::read(out.join("ca.pem")).unwrap();
        std::fs::remove_file(out.join("client-alice-key.pem")).unwrap();
        let err = run(args()).unwrap_err();
        assert!(err.to_string().contains("ca.pem exists"), "{err}");
        assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca);
        assert!(!out.join("client-alice-key.pem").exists());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
