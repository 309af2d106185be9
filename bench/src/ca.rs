//! `xds-bench ca`: what the built-in CA costs per operation, measured in-process on a
//! fresh self-signed CA: the server making a key pair and certificate for a proxy (what
//! each sidecar connecting to the secure port costs, and each renewal), signing a CSR
//! (Istio agents, relays), verifying a bootstrap token (every secure stream), and a
//! root rotation's own work (without proxies to wait for).

use anyhow::Result;
use cert_authority::{Authority, CaOptions, SpiffeId, TokenKind};
use serde_json::json;
use std::time::{Duration, Instant};

fn per_op(n: usize, f: impl FnMut(usize) -> Result<()>) -> Result<(f64, f64)> {
    let mut f = f;
    let t = Instant::now();
    for i in 0..n {
        f(i)?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((secs * 1e6 / n as f64, n as f64 / secs))
}

pub fn run(count: usize) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let ca = Authority::open(CaOptions {
        dir: dir.path().to_path_buf(),
        ..CaOptions::default()
    })?;
    let id = |i: usize| SpiffeId::new("cluster.local", "default", &format!("sa-{}", i % 100));
    let (issue_us, issue_rate) = per_op(count, |i| {
        ca.issue_with_new_key(&id(i), None, "bench")?;
        Ok(())
    })?;
    let csrs: Vec<(SpiffeId, String)> = (0..count)
        .map(|i| {
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = vec![rcgen::SanType::URI(id(i).uri().try_into()?)];
            Ok((id(i), params.serialize_request(&key)?.pem()?))
        })
        .collect::<Result<_>>()?;
    let (csr_us, csr_rate) = per_op(count, |i| {
        ca.sign_csr(&csrs[i].1, &csrs[i].0, None, "bench")?;
        Ok(())
    })?;
    let tokens: Vec<String> = (0..count)
        .map(|i| {
            ca.tokens().create(
                &id(i),
                TokenKind::Workload,
                Duration::from_secs(3600),
                Default::default(),
            )
        })
        .collect::<Result<_, _>>()?;
    let (verify_us, verify_rate) = per_op(count, |i| {
        ca.tokens().verify(&tokens[i], TokenKind::Workload)?;
        Ok(())
    })?;
    let t = Instant::now();
    ca.start_rotation()?;
    while ca.advance_rotation()?.is_some() {}
    let rotation_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(json!({
        "scenario": "ca",
        "count": count,
        "issue_with_new_key_us": issue_us,
        "issue_with_new_key_per_s": issue_rate,
        "sign_csr_us": csr_us,
        "sign_csr_per_s": csr_rate,
        "token_verify_us": verify_us,
        "token_verify_per_s": verify_rate,
        "rotation_phases_ms": rotation_ms,
    }))
}

pub fn print(v: &serde_json::Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    println!("built-in CA, {} operations each, one thread:", v["count"]);
    println!(
        "  key pair + certificate (per proxy, per renewal)  {:>8.1} µs  {:>8.0}/s",
        f("issue_with_new_key_us"),
        f("issue_with_new_key_per_s")
    );
    println!(
        "  sign a CSR (Istio agents, relays)                {:>8.1} µs  {:>8.0}/s",
        f("sign_csr_us"),
        f("sign_csr_per_s")
    );
    println!(
        "  verify a bootstrap token (each secure stream)    {:>8.1} µs  {:>8.0}/s",
        f("token_verify_us"),
        f("token_verify_per_s")
    );
    println!(
        "  root rotation, the CA's own work (3 phases)      {:>8.1} ms",
        f("rotation_phases_ms")
    );
}
