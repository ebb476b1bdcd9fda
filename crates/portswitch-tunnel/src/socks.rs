//! SOCKS5 (RFC 1928), the part a local proxy needs: no authentication, CONNECT, with
//! IPv4, IPv6 or domain-name targets. The reply is sent at once (the target is dialled
//! at the far end of the tunnel; a failure there resets the stream).

use std::net::{Ipv4Addr, Ipv6Addr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{Result, TunnelError};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE: u8 = 0xFF;
const CONNECT: u8 = 1;
const REP_OK: u8 = 0;
const REP_COMMAND: u8 = 7;
const REP_ADDRESS: u8 = 8;

/// Parses the address part of a request: `atyp`, address, port. Returns the target as
/// `host:port` (IPv6 in brackets) and the bytes used, or `None` if more are needed.
pub fn parse_target(b: &[u8]) -> Result<Option<(String, usize)>> {
    let Some(&atyp) = b.first() else {
        return Ok(None);
    };
    let (host, used) = match atyp {
        1 => {
            if b.len() < 1 + 4 {
                return Ok(None);
            }
            (Ipv4Addr::new(b[1], b[2], b[3], b[4]).to_string(), 5)
        }
        4 => {
            if b.len() < 1 + 16 {
                return Ok(None);
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[1..17]);
            (format!("[{}]", Ipv6Addr::from(a)), 17)
        }
        3 => {
            let Some(&len) = b.get(1) else {
                return Ok(None);
            };
            let len = len as usize;
            if b.len() < 2 + len {
                return Ok(None);
            }
            let name = std::str::from_utf8(&b[2..2 + len])
                .map_err(|_| TunnelError::Socks("domain name is not UTF-8".into()))?;
            if name.is_empty() || name.contains(|c: char| c.is_control() || c == ' ') {
                return Err(TunnelError::Socks(format!("bad domain name {name:?}")));
            }
            (name.to_string(), 2 + len)
        }
        _ => return Err(TunnelError::Socks(format!("address type {atyp}"))),
    };
    if b.len() < used + 2 {
        return Ok(None);
    }
    let port = u16::from_be_bytes([b[used], b[used + 1]]);
    Ok(Some((format!("{host}:{port}"), used + 2)))
}

/// Runs the SOCKS5 exchange on a new local connection; returns the target.
pub async fn accept(tcp: &mut TcpStream) -> Result<String> {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(TunnelError::Socks(format!("version {}", head[0])));
    }
    let mut methods = vec![0u8; head[1] as usize];
    tcp.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        tcp.write_all(&[VERSION, NO_ACCEPTABLE]).await?;
        return Err(TunnelError::Socks(
            "client offers no method without authentication".into(),
        ));
    }
    tcp.write_all(&[VERSION, NO_AUTH]).await?;
    let mut req = [0u8; 3];
    tcp.read_exact(&mut req).await?;
    // At most 1 + 1 + 255 + 2 bytes of address follow.
    let mut addr = Vec::with_capacity(262);
    let target = loop {
        match parse_target(&addr) {
            Ok(Some((t, _))) => break t,
            Ok(None) => {
                let mut b = [0u8; 1];
                tcp.read_exact(&mut b).await?;
                addr.push(b[0]);
            }
            Err(e) => {
                reply(tcp, REP_ADDRESS).await?;
                return Err(e);
            }
        }
    };
    if req[0] != VERSION || req[1] != CONNECT {
        reply(tcp, REP_COMMAND).await?;
        return Err(TunnelError::Socks(format!(
            "command {} (only CONNECT)",
            req[1]
        )));
    }
    reply(tcp, REP_OK).await?;
    Ok(target)
}

async fn reply(tcp: &mut TcpStream, code: u8) -> Result<()> {
    tcp.write_all(&[VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_every_address_type() {
        assert_eq!(
            parse_target(&[1, 127, 0, 0, 1, 0, 80]).unwrap(),
            Some(("127.0.0.1:80".into(), 7))
        );
        let mut v6 = vec![4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(parse_target(&v6).unwrap(), Some(("[::1]:443".into(), 19)));
        let mut d = vec![3, 11];
        d.extend_from_slice(b"example.com");
        d.extend_from_slice(&8080u16.to_be_bytes());
        assert_eq!(
            parse_target(&d).unwrap(),
            Some(("example.com:8080".into(), 15))
        );
        assert_eq!(parse_target(&d[..5]).unwrap(), None);
        assert!(parse_target(&[9, 0]).is_err());
        assert!(parse_target(&[3, 1, b' ', 0, 80]).is_err());
    }
}
