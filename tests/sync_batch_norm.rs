//! SyncBatchNorm in one process: shards on several contexts give the same
//! result as one BatchNorm over the whole batch.

mod common;
use common::{assert_close, ctx, normal};
use gpunorm::{
    BatchNorm, BatchNormConfig, Context, Mode, ReplicaGradSums, ReplicaStats, RunningStats,
};

/// Splits an `[N, C, L]` batch along N.
fn shard(x: &[f32], shape: [usize; 3], from: usize, to: usize) -> Vec<f32> {
    let per = shape[1] * shape[2];
    x[from * per..to * per].to_vec()
}

/// Asserts that running statistics (each read on its own context) agree.
fn assert_same_running_stats(
    what: &str,
    (got_ctx, got): (&Context, &RunningStats),
    (want_ctx, want): (&Context, &RunningStats),
    atol: f64,
) {
    for (g, w) in [(&got.mean, &want.mean), (&got.var, &want.var)] {
        let w: Vec<f64> = want_ctx
            .download(w)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert_close(what, &got_ctx.download(g).unwrap(), &w, atol, 1e-5);
    }
}

#[test]
fn two_replicas_equal_one_batch_norm_over_the_whole_batch() {
    let whole_ctx = ctx();
    // A second context on the same adapter stands in for a second device.
    let other_ctx = Context::new().unwrap();
    let shape = [5, 3, 7];
    let x = normal(105, 31, 1e3, 2.0);
    let w = [0.5f32, 2.0, -1.0];
    let b = [0.1f32, 0.0, 3.0];
    let make = |ctx: &Context| {
        let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
        bn.set_weight(Some(ctx.upload(&w, &[3]).unwrap())).unwrap();
        bn.set_bias(Some(ctx.upload(&b, &[3]).unwrap())).unwrap();
        bn
    };
    let mut whole = make(whole_ctx);
    let y_whole = whole_ctx
        .download(
            &whole
                .forward(
                    whole_ctx,
                    &whole_ctx.upload(&x, &shape).unwrap(),
                    Mode::Train,
                )
                .unwrap(),
        )
        .unwrap();

    let contexts = [whole_ctx, &other_ctx];
    let splits = [(0, 2), (2, 5)];
    let mut replicas: Vec<BatchNorm> = contexts.iter().map(|c| make(c)).collect();
    let inputs: Vec<_> = contexts
        .iter()
        .zip(splits)
        .map(|(c, (from, to))| {
            c.upload(&shard(&x, shape, from, to), &[to - from, 3, 7])
                .unwrap()
        })
        .collect();
    let locals: Vec<ReplicaStats> = replicas
        .iter()
        .zip(&inputs)
        .zip(contexts)
        .map(|((bn, xi), c)| bn.replica_stats(c, xi).unwrap())
        .collect();
    let global = ReplicaStats::merge(&locals).unwrap();
    let mut y_sync = Vec::new();
    for (i, c) in contexts.iter().enumerate() {
        let y = replicas[i]
            .forward_synced(c, &inputs[i], &locals[i], &global, Mode::Train)
            .unwrap();
        y_sync.extend(c.download(&y).unwrap());
    }
    let want: Vec<f64> = y_whole.iter().map(|&v| v as f64).collect();
    assert_close("synced output", &y_sync, &want, 1e-5, 1e-5);
    let r_whole = whole.running_stats().unwrap();
    for (bn, c) in replicas.iter().zip(contexts) {
        let r = bn.running_stats().unwrap();
        assert_same_running_stats("synced running stats", (c, r), (whole_ctx, r_whole), 1e-5);
        assert_eq!(r.num_batches_tracked(c).unwrap(), Some(1));
    }
}

#[test]
fn two_replicas_backward_equals_one_batch_norm_backward() {
    let whole_ctx = ctx();
    let other_ctx = Context::new().unwrap();
    let shape = [6, 4, 5];
    let x = normal(120, 41, -20.0, 3.0);
    let dy = normal(120, 42, 0.0, 1.0);
    let w = [1.5f32, -0.5, 2.0, 1.0];
    let make = |ctx: &Context| {
        let mut bn = BatchNorm::new(ctx, 4, BatchNormConfig::torch_1d()).unwrap();
        bn.set_weight(Some(ctx.upload(&w, &[4]).unwrap())).unwrap();
        bn
    };
    let mut whole = make(whole_ctx);
    whole
        .forward(
            whole_ctx,
            &whole_ctx.upload(&x, &shape).unwrap(),
            Mode::Train,
        )
        .unwrap();
    let g_whole = whole
        .backward(whole_ctx, &whole_ctx.upload(&dy, &shape).unwrap())
        .unwrap();
    let dx_whole: Vec<f64> = whole_ctx
        .download(&g_whole.grad_input)
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let dw_whole: Vec<f64> = whole_ctx
        .download(g_whole.grad_weight.as_ref().unwrap())
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();

    let contexts = [whole_ctx, &other_ctx];
    let splits = [(0, 1), (1, 6)]; // a shard of one sample: one value per (n, c)
    let mut replicas: Vec<BatchNorm> = contexts.iter().map(|c| make(c)).collect();
    let mut xs = Vec::new();
    let mut dys = Vec::new();
    for (c, (from, to)) in contexts.iter().zip(splits) {
        xs.push(
            c.upload(&shard(&x, shape, from, to), &[to - from, 4, 5])
                .unwrap(),
        );
        dys.push(
            c.upload(&shard(&dy, shape, from, to), &[to - from, 4, 5])
                .unwrap(),
        );
    }
    let locals: Vec<ReplicaStats> = (0..2)
        .map(|i| replicas[i].replica_stats(contexts[i], &xs[i]).unwrap())
        .collect();
    let global = ReplicaStats::merge(&locals).unwrap();
    for i in 0..2 {
        replicas[i]
            .forward_synced(contexts[i], &xs[i], &locals[i], &global, Mode::Train)
            .unwrap();
    }
    let sums: Vec<ReplicaGradSums> = (0..2)
        .map(|i| replicas[i].replica_grad_sums(contexts[i], &dys[i]).unwrap())
        .collect();
    let total = ReplicaGradSums::all_reduce(&sums).unwrap();
    let mut dx = Vec::new();
    let mut dw = [0.0f64; 4];
    for i in 0..2 {
        let g = replicas[i]
            .backward_synced(contexts[i], &dys[i], &sums[i], &total)
            .unwrap();
        dx.extend(contexts[i].download(&g.grad_input).unwrap());
        for (acc, v) in dw.iter_mut().zip(
            contexts[i]
                .download(g.grad_weight.as_ref().unwrap())
                .unwrap(),
        ) {
            *acc += v as f64;
        }
    }
    assert_close("synced grad_input", &dx, &dx_whole, 1e-5, 1e-4);
    let dw: Vec<f32> = dw.iter().map(|&v| v as f32).collect();
    assert_close("summed grad_weight", &dw, &dw_whole, 1e-4, 1e-4);
}

#[test]
fn merge_is_order_independent() {
    let part = |count: f64, mean: f64, m2: f64| ReplicaStats {
        count,
        mean: vec![mean],
        m2: vec![m2],
        shift: vec![0.0],
    };
    let parts = [
        part(3.0, 1.0, 2.0),
        part(5.0, 10.0, 7.0),
        part(1.0, -4.0, 0.0),
    ];
    let a = ReplicaStats::merge(&parts).unwrap();
    let b = ReplicaStats::merge(&[parts[2].clone(), parts[0].clone(), parts[1].clone()]).unwrap();
    assert_eq!(a.count, 9.0);
    assert!((a.mean[0] - b.mean[0]).abs() < 1e-12 && (a.m2[0] - b.m2[0]).abs() < 1e-9);
    // The pooled moments, from the parts' own: mean Σnᵢmᵢ/n = 49/9, and
    // M2 = ΣM2ᵢ + Σnᵢ(mᵢ − mean)².
    let mean = 49.0 / 9.0;
    let m2 = 9.0
        + [(3.0, 1.0), (5.0, 10.0), (1.0, -4.0)]
            .iter()
            .map(|(n, m): &(f64, f64)| n * (m - mean).powi(2))
            .sum::<f64>();
    assert!((a.mean[0] - mean).abs() < 1e-12, "{} vs {mean}", a.mean[0]);
    assert!((a.m2[0] - m2).abs() < 1e-9, "{} vs {m2}", a.m2[0]);
}

#[test]
fn an_infinite_replica_mean_stays_infinite_through_empty_and_finite_replicas() {
    // torch drops empty replicas and weights the means: an inf among the
    // values keeps the global mean ±inf. Merging the empty replica's mean
    // of 0 (delta·0) or a finite one (inf − inf) used to give NaN.
    let part = |count: f64, mean: f64| ReplicaStats {
        count,
        mean: vec![mean],
        m2: vec![0.0],
        shift: vec![0.0],
    };
    for parts in [
        vec![part(2.0, f64::INFINITY), part(0.0, 0.0)],
        vec![part(2.0, f64::INFINITY), part(3.0, 1.0)],
        vec![part(0.0, 0.0), part(3.0, 1.0), part(2.0, f64::NEG_INFINITY)],
    ] {
        let global = ReplicaStats::merge(&parts).unwrap();
        let want = parts
            .iter()
            .map(|p| p.mean[0])
            .find(|m| m.is_infinite())
            .unwrap();
        assert_eq!(
            global.mean[0],
            want,
            "{:?}",
            parts
                .iter()
                .map(|p| (p.count, p.mean[0]))
                .collect::<Vec<_>>()
        );
    }
    let opposite = ReplicaStats::merge(&[part(1.0, f64::INFINITY), part(1.0, f64::NEG_INFINITY)]);
    assert!(
        opposite.unwrap().mean[0].is_nan(),
        "inf − inf stays NaN, as in torch"
    );
}

#[test]
fn a_replica_with_an_empty_shard_still_takes_the_global_running_stats() {
    let ctx = ctx();
    let x = normal(3 * 2 * 5, 77, 4.0, 2.0);
    let full = ctx.upload(&x, &[3, 2, 5]).unwrap();
    let empty = ctx.upload(&[], &[0, 2, 5]).unwrap();
    let mut a = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    let mut b = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    let la = a.replica_stats(ctx, &full).unwrap();
    let lb = b.replica_stats(ctx, &empty).unwrap();
    let global = ReplicaStats::merge(&[la.clone(), lb.clone()]).unwrap();
    a.forward_synced(ctx, &full, &la, &global, Mode::Train)
        .unwrap();
    let y = b
        .forward_synced(ctx, &empty, &lb, &global, Mode::Train)
        .unwrap();
    assert_eq!(y.shape(), &[0, 2, 5]);
    let (ra, rb) = (a.running_stats().unwrap(), b.running_stats().unwrap());
    assert_eq!(
        ctx.download(&ra.mean).unwrap(),
        ctx.download(&rb.mean).unwrap()
    );
    assert_eq!(
        ctx.download(&ra.var).unwrap(),
        ctx.download(&rb.var).unwrap()
    );
    assert_eq!(rb.num_batches_tracked(ctx).unwrap(), Some(1));
    // And both are those of one BatchNorm over the whole (same) batch.
    let mut whole = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    whole.forward(ctx, &full, Mode::Train).unwrap();
    let rw = whole.running_stats().unwrap();
    assert_same_running_stats("empty replica vs whole", (ctx, rb), (ctx, rw), 1e-6);
}

#[test]
fn eval_without_running_stats_is_a_local_forward_and_backward_as_in_torch() {
    // torch syncs in training only: in eval, a SyncBatchNorm without
    // running statistics normalizes each shard with its own batch
    // statistics, and refuses a shard of one value per channel.
    let ctx = ctx();
    let untracked = || {
        let config = BatchNormConfig {
            track_running_stats: false,
            ..BatchNormConfig::torch_1d()
        };
        BatchNorm::new(ctx, 3, config).unwrap()
    };
    let x = normal(5 * 3 * 4, 41, 2.0, 3.0);
    let dy = normal(2 * 3 * 4, 42, 0.0, 1.0);
    let shards = [
        ctx.upload(&shard(&x, [5, 3, 4], 0, 2), &[2, 3, 4]).unwrap(),
        ctx.upload(&shard(&x, [5, 3, 4], 2, 5), &[3, 3, 4]).unwrap(),
    ];
    let (mut synced, mut local) = (untracked(), untracked());
    let stats: Vec<ReplicaStats> = shards
        .iter()
        .map(|s| synced.replica_stats(ctx, s).unwrap())
        .collect();
    let global = ReplicaStats::merge(&stats).unwrap();
    let y = synced
        .forward_synced(ctx, &shards[0], &stats[0], &global, Mode::Eval)
        .unwrap();
    let want = local.forward(ctx, &shards[0], Mode::Eval).unwrap();
    let wide = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
    let y_want = wide(ctx.download(&want).unwrap());
    assert_close("eval output", &ctx.download(&y).unwrap(), &y_want, 0.0, 0.0);

    let dy = ctx.upload(&dy, &[2, 3, 4]).unwrap();
    let sums = synced.replica_grad_sums(ctx, &dy).unwrap();
    let other = ReplicaGradSums {
        count: 12.0,
        sum_dy: vec![5.0; 3],
        sum_dy_xhat: vec![-7.0; 3],
    };
    let all = ReplicaGradSums::all_reduce(&[sums.clone(), other]).unwrap();
    let got = synced.backward_synced(ctx, &dy, &sums, &all).unwrap();
    let dx_want = wide(
        ctx.download(&local.backward(ctx, &dy).unwrap().grad_input)
            .unwrap(),
    );
    let dx = ctx.download(&got.grad_input).unwrap();
    assert_close("eval grad_input", &dx, &dx_want, 0.0, 0.0);

    let one = ctx.upload(&[1.0, 2.0, 3.0], &[1, 3]).unwrap();
    let one_stats = synced.replica_stats(ctx, &one).unwrap();
    let err = synced
        .forward_synced(ctx, &one, &one_stats, &global, Mode::Eval)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Expected more than 1 value per channel"),
        "{err}"
    );
}

#[test]
fn a_global_batch_of_one_value_per_channel_is_refused_by_every_replica() {
    // One value per channel over all replicas: the replica holding it and
    // the one with an empty shard both refuse the step, and neither's
    // running statistics or counter move, so the replicas stay equal.
    let ctx = ctx();
    let one = ctx.upload(&[1.0, 2.0], &[1, 2]).unwrap();
    let empty = ctx.upload(&[], &[0, 2]).unwrap();
    let mut replicas = [
        BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap(),
        BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap(),
    ];
    let stats: Vec<ReplicaStats> = [&one, &empty]
        .iter()
        .zip(&replicas)
        .map(|(x, bn)| bn.replica_stats(ctx, x).unwrap())
        .collect();
    let global = ReplicaStats::merge(&stats).unwrap();
    for ((bn, x), local) in replicas.iter_mut().zip([&one, &empty]).zip(&stats) {
        let err = bn
            .forward_synced(ctx, x, local, &global, Mode::Train)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Expected more than 1 value per channel"),
            "{err}"
        );
        let r = bn.running_stats().unwrap();
        assert_eq!(ctx.download(&r.mean).unwrap(), [0.0; 2]);
        assert_eq!(ctx.download(&r.var).unwrap(), [1.0; 2]);
        assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(0));
    }
}

#[test]
fn replicas_of_one_sample_without_running_stats_equal_one_batch_norm() {
    // One sample per replica and no running statistics: the view of a
    // replica's shard is the row kernels' (A = 1), whose forward keeps no
    // partials, but the synced forward writes one per channel after the
    // statistics: its scratch was a vec4 per channel too short, and the
    // forward a wgpu error (found in review).
    let ctx = ctx();
    let config = BatchNormConfig {
        track_running_stats: false,
        ..BatchNormConfig::torch_1d()
    };
    let x = normal(2 * 4 * 16, 35, 2.0, 1.5);
    let mut whole = BatchNorm::new(ctx, 4, config.clone()).unwrap();
    let want: Vec<f64> = ctx
        .download(
            &whole
                .forward(ctx, &ctx.upload(&x, &[2, 4, 16]).unwrap(), Mode::Train)
                .unwrap(),
        )
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut replicas: Vec<BatchNorm> = (0..2)
        .map(|_| BatchNorm::new(ctx, 4, config.clone()).unwrap())
        .collect();
    let shards: Vec<_> = (0..2)
        .map(|r| {
            ctx.upload(&shard(&x, [2, 4, 16], r, r + 1), &[1, 4, 16])
                .unwrap()
        })
        .collect();
    let stats: Vec<ReplicaStats> = replicas
        .iter()
        .zip(&shards)
        .map(|(bn, x)| bn.replica_stats(ctx, x).unwrap())
        .collect();
    let global = ReplicaStats::merge(&stats).unwrap();
    for (r, (bn, x)) in replicas.iter_mut().zip(&shards).enumerate() {
        let y = bn
            .forward_synced(ctx, x, &stats[r], &global, Mode::Train)
            .unwrap();
        assert_close(
            &format!("replica {r}"),
            &ctx.download(&y).unwrap(),
            &want[r * 64..(r + 1) * 64],
            1e-5,
            1e-5,
        );
    }
}
