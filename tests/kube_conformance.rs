//! Kubernetes' own network conformance tests pass on weft: every
//! `[sig-network] ... [Conformance]` spec of the upstream e2e suite (built
//! at the cluster's release), run by ginkgo against a real two-node cluster
//! where weft is the pod network and the only Service proxy. The full run,
//! NetworkPolicy and Service suites included, is `weft-lab kube e2e`.

use weft_e2e::kube::TestCluster;
use weft_lab::kube::{artifacts, e2e};

#[tokio::test(flavor = "multi_thread")]
async fn every_sig_network_conformance_spec_passes() {
    let c = TestCluster::up("kcf", 2).await;
    let repo = artifacts::repo_root();
    let opts = e2e::RunOptions {
        suites: vec![e2e::CONFORMANCE],
        skips: e2e::read_skips(&repo.join("deploy/kube/e2e-skips.txt")).expect("skip list"),
        procs: 4,
        report_dir: c.cfg.state_dir.join("e2e"),
    };
    let started = std::time::Instant::now();
    let summary = c.run_e2e(&opts).await.expect("running the e2e suite");
    println!(
        "{}\n(in {:.0} s; JUnit and the full log in {})",
        summary.table(),
        started.elapsed().as_secs_f64(),
        opts.report_dir.display()
    );
    let (passed, failed, skipped) = summary.counts(&e2e::CONFORMANCE);
    if failed > 0 {
        let log = std::fs::read_to_string(opts.report_dir.join("e2e.log")).unwrap_or_default();
        // The failures' own sections of the log, for CI's output.
        for block in log
            .split("------------------------------")
            .filter(|b| b.contains("[FAILED]"))
        {
            let lines: Vec<&str> = block.lines().collect();
            println!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
    assert_eq!(failed, 0, "conformance specs failed (above)");
    assert_eq!(skipped, 0, "conformance specs were skipped: all must run");
    assert!(passed >= 40, "only {passed} conformance specs ran");
    c.down().await;
}
