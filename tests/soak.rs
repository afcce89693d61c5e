//! Soak (issue 9, item 7): 10,000 alternating train/eval forwards of a
//! small BatchNorm must not grow the process's memory. Every forward
//! allocates an output and a scratch buffer and submits; if the engine (or
//! wgpu under it) kept anything per call, the resident set would climb by
//! at least the ~100 bytes of those buffers per call, plus bookkeeping.

mod common;
use std::time::Instant;

use common::{ctx, normal};
use gpunorm::{BatchNorm, BatchNormConfig, Mode};

/// Resident set size in bytes: `VmRSS` of `/proc/self/status` (the same
/// count as the second field of `/proc/self/statm`, but in kB rather than
/// pages, so no page-size guess is needed).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[cfg(target_os = "linux")]
#[test]
fn ten_thousand_train_and_eval_forwards_do_not_grow_memory() {
    const WARMUP: usize = 1_000;
    const TOTAL: usize = 10_000;
    const MAX_GROWTH: u64 = 4 << 20;
    let ctx = ctx();
    let shape = [4, 3, 5];
    let x = ctx.upload(&normal(60, 1, 0.5, 2.0), &shape).unwrap();
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
    let start = Instant::now();
    let mut run = |from: usize, to: usize| {
        let mut last = None;
        for i in from..to {
            let mode = if i % 2 == 0 { Mode::Train } else { Mode::Eval };
            last = Some(bn.forward(ctx, &x, mode).unwrap());
        }
        // Wait for the device so everything submitted so far completed.
        ctx.download(&last.unwrap()).unwrap()
    };
    run(0, WARMUP);
    let after_warmup = resident_bytes();
    let y = run(WARMUP, TOTAL);
    let after_all = resident_bytes();
    let elapsed = start.elapsed();
    assert!(y.iter().all(|v| v.is_finite()));
    let count = bn
        .running_stats()
        .unwrap()
        .num_batches_tracked(ctx)
        .unwrap();
    assert_eq!(
        count,
        Some((TOTAL / 2) as i64),
        "one count per train forward"
    );
    let growth = after_all.saturating_sub(after_warmup);
    eprintln!(
        "soak: {TOTAL} forwards in {:.1} s ({:.0} µs each); resident {:.1} MiB after {WARMUP}, {:.1} MiB after {TOTAL} (growth {:.2} MiB)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / TOTAL as f64,
        after_warmup as f64 / (1 << 20) as f64,
        after_all as f64 / (1 << 20) as f64,
        growth as f64 / (1 << 20) as f64,
    );
    assert!(
        growth < MAX_GROWTH,
        "resident memory grew by {growth} bytes over {} forwards",
        TOTAL - WARMUP
    );
}
