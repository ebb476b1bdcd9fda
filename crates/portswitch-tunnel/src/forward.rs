//! `-L` forward specifications, as `ssh -L` takes them.

use std::net::SocketAddr;

use crate::error::{Result, TunnelError};
use crate::frame::CompressPolicy;

/// `[bind:]port:host:hostport[,compress=auto|never]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: String,
    pub policy: Option<CompressPolicy>,
}

/// Splits at colons outside brackets.
fn parts(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ':' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl std::str::FromStr for Forward {
    type Err = TunnelError;
    fn from_str(spec: &str) -> Result<Forward> {
        let bad = |why: &str| TunnelError::Address {
            addr: spec.to_string(),
            why: why.to_string(),
        };
        let (main, opts) = match spec.split_once(',') {
            Some((m, o)) => (m, Some(o)),
            None => (spec, None),
        };
        let policy = match opts {
            None => None,
            Some(o) => Some(
                o.strip_prefix("compress=")
                    .ok_or_else(|| bad("the only option is compress=auto|never"))?
                    .parse::<CompressPolicy>()
                    .map_err(|e| bad(&e))?,
            ),
        };
        let p = parts(main);
        let (bind, port, host, hostport) = match p.as_slice() {
            [port, host, hostport] => ("127.0.0.1", *port, *host, *hostport),
            [bind, port, host, hostport] => (*bind, *port, *host, *hostport),
            _ => return Err(bad("expected [bind:]port:host:hostport")),
        };
        let bind = bind.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad("listening port"))?;
        let _: u16 = hostport.parse().map_err(|_| bad("target port"))?;
        if host.is_empty() {
            return Err(bad("empty target host"));
        }
        let ip: std::net::IpAddr = if bind == "localhost" {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            bind.parse().map_err(|_| bad("bind address"))?
        };
        Ok(Forward {
            listen: SocketAddr::new(ip, port),
            target: format!("{host}:{hostport}"),
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_like_ssh() {
        let f: Forward = "127.0.0.1:8080:example.com:80".parse().unwrap();
        assert_eq!(f.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(f.target, "example.com:80");
        let f: Forward = "8080:10.0.0.1:22,compress=never".parse().unwrap();
        assert_eq!(f.listen.ip().to_string(), "127.0.0.1");
        assert_eq!(f.policy, Some(CompressPolicy::Never));
        let f: Forward = "[::1]:9000:[2001:db8::1]:443".parse().unwrap();
        assert_eq!(f.listen, "[::1]:9000".parse().unwrap());
        assert_eq!(f.target, "[2001:db8::1]:443");
        for bad in [
            "",
            "8080",
            "x:a:80",
            "1:2:3:4:5",
            "8080:h:99999",
            "8080:h:80,zip=1",
        ] {
            assert!(bad.parse::<Forward>().is_err(), "{bad}");
        }
    }
}
