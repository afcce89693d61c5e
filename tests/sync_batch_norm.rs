//! SyncBatchNorm in one process: shards on several contexts give the same
//! result as one BatchNorm over the whole batch.

mod common;
use common::{assert_close, ctx, normal};
use gpunorm::{BatchNorm, BatchNormConfig, Context, Mode, ReplicaStats};

/// Splits an `[N, C, L]` batch along N.
fn shard(x: &[f32], shape: [usize; 3], from: usize, to: usize) -> Vec<f32> {
    let per = shape[1] * shape[2];
    x[from * per..to * per].to_vec()
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
        for (got, want) in [(&r.mean, &r_whole.mean), (&r.var, &r_whole.var)] {
            let want: Vec<f64> = whole_ctx
                .download(want)
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert_close(
                "synced running stats",
                &c.download(got).unwrap(),
                &want,
                1e-5,
                1e-5,
            );
        }
        assert_eq!(r.num_batches_tracked(c).unwrap(), Some(1));
    }
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
}
