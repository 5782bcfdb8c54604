//! Keeps `tickflow bench` working: a small run through the four service processes, which
//! must deliver every order exactly once. (Its figures are not checked: speed lives in
//! BENCHMARKS.md, not in tests.)

use std::process::Command;

#[test]
fn a_small_bench_delivers_every_order_exactly_once() {
    let output = Command::new(env!("CARGO_BIN_EXE_tickflow"))
        .args([
            "bench",
            "--events",
            "2000",
            "--partitions",
            "4",
            "--symbols",
            "4",
            "--json",
        ])
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tickflow bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tickflow bench failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["events"], 2000);
    assert_eq!(report["accepted"], 2000);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["stage_entries"]["inbound"], 2000);
    assert!(report["latency_us"]["count"].as_u64().unwrap() >= 2000);
    for service in ["ingest", "transform", "engine", "analytics"] {
        assert!(
            report["services"][service]["peak_rss_mib"]
                .as_f64()
                .unwrap()
                > 0.0,
            "{service}"
        );
    }
}
