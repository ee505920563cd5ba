//! The XTS engine beside `openssl speed -evp aes-256-xts`, in the same run.

use std::process::Command;
use std::time::{Duration, Instant};

use vmcrypt_crypto::{MasterKey, Xts};

#[derive(Debug, serde::Serialize)]
pub struct XtsReport {
    /// (what, GB/s)
    pub rows: Vec<(String, f64)>,
    pub ratios: Vec<(String, f64)>,
}

impl XtsReport {
    pub fn markdown(&self) -> String {
        let mut s = String::from("\n| XTS engine (one core) | GB/s |\n|---|---:|\n");
        for (w, g) in &self.rows {
            s.push_str(&format!("| {w} | {g:.2} |\n"));
        }
        s.push_str("\n| XTS ratio | value |\n|---|---:|\n");
        for (w, r) in &self.ratios {
            s.push_str(&format!("| {w} | {r:.2}x |\n"));
        }
        s
    }
}

/// GB/s of `openssl speed` for one block size (None if it cannot run).
fn openssl(bytes: usize, secs: u32) -> Option<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-256-xts",
            "-bytes",
            &bytes.to_string(),
            "-seconds",
            &secs.to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with("AES-256-XTS"))?;
    let k = line
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse::<f64>()
        .ok()?;
    Some(k * 1000.0 / 1e9)
}

/// GB/s of an engine over 4 KiB requests of 512-byte sectors.
fn ours(encrypt: bool, aws_lc: bool, dur: Duration) -> f64 {
    let key = MasterKey::generate();
    let mut xts = if aws_lc {
        Xts::new_aws_lc(&key)
    } else {
        Xts::new(&key)
    }
    .unwrap();
    let src = vec![0x5au8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut sector = 0u64;
    while start.elapsed() < dur {
        for (s, d) in src.chunks(4096).zip(dst.chunks_mut(4096)) {
            if encrypt {
                xts.encrypt(sector, s, d).unwrap();
            } else {
                xts.decrypt_in_place(sector, d).unwrap();
            }
            sector += 8;
        }
        bytes += src.len() as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// GB/s of the engine encrypting 128 KiB requests out of place from a
/// source too large for the CPU's caches (64 MiB) into one 128 KiB buffer:
/// as large requests from guest memory or the page cache run, where the
/// source comes from DRAM.
fn ours_from_memory(dur: Duration) -> f64 {
    const REQ: usize = 128 << 10;
    let key = MasterKey::generate();
    let mut xts = Xts::new(&key).unwrap();
    let src = vec![0x5au8; 64 << 20];
    let mut dst = vec![0u8; REQ];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < dur {
        for (i, s) in src.chunks(REQ).enumerate() {
            xts.encrypt((i * REQ / 512) as u64, s, &mut dst).unwrap();
        }
        bytes += src.len() as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

pub fn run(quick: bool) -> XtsReport {
    let (secs, dur) = if quick {
        (1, Duration::from_millis(300))
    } else {
        (3, Duration::from_secs(3))
    };
    eprintln!("XTS engine benchmark ...");
    let engine = Xts::new(&MasterKey::generate()).unwrap().engine();
    let enc = ours(true, false, dur);
    let dec = ours(false, false, dur);
    let aws = ours(true, true, dur);
    let cold = ours_from_memory(dur);
    let o4k = openssl(4096, secs);
    let o512 = openssl(512, secs);
    let mut rows = vec![
        (
            format!("vmcrypt ({engine}) encrypt, 4 KiB requests of 512-byte sectors (fused copy)"),
            enc,
        ),
        (
            format!("vmcrypt ({engine}) decrypt in place, 4 KiB requests of 512-byte sectors"),
            dec,
        ),
        (
            "aws-lc EVP encrypt, same requests (one call per sector)".to_string(),
            aws,
        ),
        (
            format!("vmcrypt ({engine}) encrypt, 128 KiB requests from a 64 MiB source (DRAM)"),
            cold,
        ),
    ];
    let mut ratios = Vec::new();
    if let Some(o) = o4k {
        rows.push(("openssl speed -evp aes-256-xts -bytes 4096".into(), o));
        ratios.push((
            "vmcrypt encrypt (4 KiB requests) / openssl 4096-byte units".into(),
            enc / o,
        ));
    }
    if let Some(o) = o512 {
        rows.push(("openssl speed -evp aes-256-xts -bytes 512".into(), o));
        ratios.push((
            "vmcrypt encrypt (512-byte units, batched per 4 KiB) / openssl 512-byte units".into(),
            enc / o,
        ));
        ratios.push((
            "vmcrypt decrypt (512-byte units, batched per 4 KiB) / openssl 512-byte units".into(),
            dec / o,
        ));
    }
    XtsReport { rows, ratios }
}
