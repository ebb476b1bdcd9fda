//! Shaping of a connection's first bytes.
//!
//! Uniformly random bytes are themselves a fingerprint: the Great Firewall's detector
//! of "fully encrypted" traffic (Wu et al., USENIX Security 2023; OpenGFW's
//! `analyzer/tcp/fet.go`) blocks a connection whose first packet has an average
//! popcount between 3.4 and 4.6 bits per byte and none of its other exemptions. So the
//! hellos (the only bytes before the record stream) are encoded three bytes to four,
//! six bits to a byte, over an alphabet of 64 byte values of at most three set bits
//! each. The alphabet is drawn from the 93 such values by the pre-shared key, so it
//! differs between deployments, and what is encoded is ciphertext and a random salt:
//! no clear-text field, yet the average popcount is at most 3 (about 2.5).
//!
//! [`fet_exempt`] is the detector's exemption predicate, for tests and for
//! `portswitch tunnel` to check its own output.

use crate::error::{Result, TunnelError};

/// An encoding alphabet: 64 low-weight byte values and the reverse table.
#[derive(Clone)]
pub struct Alphabet {
    symbols: [u8; 64],
    reverse: [u8; 256],
}

const INVALID: u8 = 0xFF;

impl Alphabet {
    /// The alphabet chosen by `seed` (derived from the pre-shared key).
    pub fn from_seed(seed: &[u8; 64]) -> Alphabet {
        let mut pool: Vec<u8> = (0..=255u8).filter(|b| b.count_ones() <= 3).collect();
        assert_eq!(pool.len(), 93);
        // A partial Fisher-Yates shuffle driven by the seed picks and orders 64
        // values (the small modulo bias does not matter: the seed is secret anyway).
        for (i, &r) in seed.iter().enumerate() {
            let k = i + r as usize % (pool.len() - i);
            pool.swap(i, k);
        }
        let mut symbols = [0u8; 64];
        symbols.copy_from_slice(&pool[..64]);
        let mut reverse = [INVALID; 256];
        for (i, &s) in symbols.iter().enumerate() {
            reverse[s as usize] = i as u8;
        }
        Alphabet { symbols, reverse }
    }

    /// Encodes `raw` (its length a multiple of 3) into `out`, four bytes per three.
    pub fn encode(&self, raw: &[u8], out: &mut Vec<u8>) {
        assert!(raw.len().is_multiple_of(3), "encode takes whole groups");
        out.reserve(raw.len() / 3 * 4);
        for g in raw.chunks_exact(3) {
            let v = (g[0] as u32) << 16 | (g[1] as u32) << 8 | g[2] as u32;
            for shift in [18, 12, 6, 0] {
                out.push(self.symbols[((v >> shift) & 63) as usize]);
            }
        }
    }

    /// Decodes `enc` (its length a multiple of 4) into `out`.
    pub fn decode(&self, enc: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if !enc.len().is_multiple_of(4) {
            return Err(TunnelError::malformed("hello", "partial group"));
        }
        out.reserve(enc.len() / 4 * 3);
        for g in enc.chunks_exact(4) {
            let mut v = 0u32;
            for &b in g {
                let s = self.reverse[b as usize];
                if s == INVALID {
                    return Err(TunnelError::Auth);
                }
                v = v << 6 | s as u32;
            }
            out.extend_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8]);
        }
        Ok(())
    }

    pub fn symbols(&self) -> &[u8; 64] {
        &self.symbols
    }
}

/// The measures of OpenGFW's fully-encrypted-traffic analyzer on a first packet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FetMeasures {
    /// Ex1: average set bits per byte.
    pub popcount_avg: f32,
    /// Ex2: the first six bytes are printable ASCII.
    pub first_six_printable: bool,
    /// Ex3: the share of printable bytes.
    pub printable_share: f32,
    /// Ex4: the longest run of printable bytes.
    pub printable_run_max: usize,
    /// Ex5: starts like TLS or an HTTP method.
    pub tls_or_http: bool,
}

fn printable(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

pub fn fet_measures(data: &[u8]) -> FetMeasures {
    let n = data.len().max(1) as f32;
    let popcount_avg = data.iter().map(|b| b.count_ones()).sum::<u32>() as f32 / n;
    let first_six_printable = data.len() >= 6 && data[..6].iter().all(|&b| printable(b));
    let printable_share = data.iter().filter(|&&b| printable(b)).count() as f32 / n;
    let mut run = 0;
    let mut printable_run_max = 0;
    for &b in data {
        run = if printable(b) { run + 1 } else { 0 };
        printable_run_max = printable_run_max.max(run);
    }
    let tls_or_http = data.len() >= 3
        && ((data[0] == 0x16 && data[1] == 0x03 && data[2] <= 0x03)
            || [
                b"GET", b"HEA", b"POS", b"PUT", b"DEL", b"CON", b"OPT", b"TRA", b"PAT",
            ]
            .iter()
            .any(|m| &data[..3] == *m));
    FetMeasures {
        popcount_avg,
        first_six_printable,
        printable_share,
        printable_run_max,
        tls_or_http,
    }
}

/// Whether the detector lets a connection whose first packet is `data` pass (exempt),
/// exactly as OpenGFW's `fet.go` decides it. A non-exempt connection is blocked.
pub fn fet_exempt(data: &[u8]) -> bool {
    if data.is_empty() {
        return true; // the analyzer waits for data
    }
    let m = fet_measures(data);
    m.popcount_avg <= 3.4
        || m.popcount_avg >= 4.6
        || m.first_six_printable
        || m.printable_share > 0.5
        || m.printable_run_max > 20
        || m.tls_or_http
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabets_are_64_distinct_low_weight_values_and_round_trip() {
        for s in 0..50u8 {
            let seed: [u8; 64] =
                std::array::from_fn(|i| (i as u8).wrapping_mul(31) ^ s.wrapping_mul(37));
            let a = Alphabet::from_seed(&seed);
            let mut seen = std::collections::HashSet::new();
            for &b in a.symbols() {
                assert!(b.count_ones() <= 3);
                assert!(seen.insert(b));
            }
            let raw: Vec<u8> = (0..300u32).map(|i| (i * 7 + s as u32) as u8).collect();
            let mut enc = Vec::new();
            a.encode(&raw, &mut enc);
            assert!(fet_exempt(&enc));
            let mut back = Vec::new();
            a.decode(&enc, &mut back).unwrap();
            assert_eq!(back, raw);
        }
    }

    #[test]
    fn random_bytes_are_flagged_and_printable_or_tls_are_exempt() {
        let random: Vec<u8> = (0..200).map(|_| fastrand::u8(..)).collect();
        // Shadowsocks-like: uniform bytes, popcount about 4: not exempt.
        let m = fet_measures(&random);
        if (3.4..4.6).contains(&m.popcount_avg)
            && !m.first_six_printable
            && m.printable_share <= 0.5
            && m.printable_run_max <= 20
            && !m.tls_or_http
        {
            assert!(!fet_exempt(&random));
        }
        assert!(fet_exempt(b"GET / HTTP/1.1\r\n"));
        assert!(fet_exempt(&[0x16, 0x03, 0x01, 0x99, 0xf0, 0x0f, 0xaa]));
        assert!(fet_exempt(b"SSH-2.0-OpenSSH_9.2"));
    }
}
