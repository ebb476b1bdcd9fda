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

fn write_new(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = private;
    let mut f = opts
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
}

pub fn run(args: CertArgs) -> AppResult {
    std::fs::create_dir_all(&args.out)?;
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
