//! Data centres on one machine: network namespaces (`psw<pid>-dc<k>`), each joined to
//! the harness's own namespace (the "WAN") by a veth pair, 10.N.k.1 on the WAN side
//! and 10.N.k.2 inside. A data centre is cut off by taking its end of the link down
//! and mended by bringing it up again. Needs root; everything made is removed when
//! the [`Net`] is dropped.

use std::net::Ipv4Addr;

use crate::Result;

/// Runs `ip` with `args`; the error names the command and what it printed.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

/// The three data centres' namespaces and links; removed on drop.
pub struct Net {
    tag: String,
    octet: u8,
    made: Vec<String>,
}

impl Net {
    pub fn create(dcs: u8) -> Result<Net> {
        let pid = std::process::id();
        let mut net = Net {
            tag: pid.to_string(),
            octet: 100 + (pid % 100) as u8,
            made: Vec::new(),
        };
        for k in 1..=dcs {
            let ns = net.ns(k);
            ip(&["netns", "add", &ns])
                .map_err(|e| format!("{e} (network namespaces need root)"))?;
            net.made.push(ns.clone());
            let (w, d) = (net.wan_if(k), net.dc_if(k));
            ip(&["link", "add", &w, "type", "veth", "peer", "name", &d])?;
            ip(&["link", "set", &d, "netns", &ns])?;
            ip(&["addr", "add", &format!("{}/24", net.wan_ip(k)), "dev", &w])?;
            ip(&["link", "set", &w, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.dc_ip(k)),
                "dev",
                &d,
            ])?;
            net.mend(k)?;
        }
        Ok(net)
    }

    pub fn ns(&self, k: u8) -> String {
        format!("psw{}-dc{k}", self.tag)
    }
    pub fn wan_if(&self, k: u8) -> String {
        format!("psw{}w{k}", self.tag)
    }
    pub fn dc_if(&self, k: u8) -> String {
        format!("psw{}d{k}", self.tag)
    }
    /// The WAN end of data centre k's link: the relay listens here.
    pub fn wan_ip(&self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, k, 1)
    }
    /// Member k's own address, inside its namespace.
    pub fn dc_ip(&self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, k, 2)
    }
    /// Takes data centre k off the network: its end of the link goes down, the WAN
    /// end loses carrier, and packets either way are dropped.
    pub fn cut(&self, k: u8) -> Result<()> {
        ip(&["-n", &self.ns(k), "link", "set", &self.dc_if(k), "down"])
    }

    /// Puts data centre k back (the route out goes with the link, so it is restored).
    pub fn mend(&self, k: u8) -> Result<()> {
        let ns = self.ns(k);
        ip(&["-n", &ns, "link", "set", &self.dc_if(k), "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "replace",
            "default",
            "via",
            &self.wan_ip(k).to_string(),
        ])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair with it.
        for ns in &self.made {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
