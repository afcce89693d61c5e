//! SyncBatchNorm across processes with MPI: each rank normalizes its shard
//! of one batch with statistics merged over every rank, and the result
//! equals one BatchNorm over the concatenated batch.
//!
//! ```sh
//! cargo build --release --features mpi --example sync_batchnorm_mpi
//! mpirun -n 2 target/release/examples/sync_batchnorm_mpi
//! ```
//!
//! Only a few numbers per channel cross the network: `(count, mean, M2)`
//! after the local statistics pass, `(Σdy, Σdy·x̂)` in the backward pass.

use gpunorm::{
    BatchNorm, BatchNormConfig, Context, GpuTensor, Mode, ReplicaGradSums, ReplicaStats,
};
use mpi::collective::SystemOperation;
use mpi::traits::*;

const N: usize = 9;
const C: usize = 3;
const L: usize = 11;
const TOLERANCE: f64 = 1e-5;

/// The same deterministic batch on every rank.
fn batch(seed: u64, offset: f32) -> Vec<f32> {
    let mut s = seed;
    (0..N * C * L)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            offset + (i % C) as f32 + ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

/// Largest |a − b| / max(1, |b|): absolute for values below 1, relative
/// above (dγ sums over a whole batch reach tens, where f32 rounding of the
/// per-rank partial sums alone is ~1e-6 relative).
fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x as f64 - y as f64).abs() / (y as f64).abs().max(1.0);
            // A NaN on one side only is a failure (f64::max would drop it).
            if d.is_nan() && !(x.is_nan() && y.is_nan()) {
                f64::INFINITY
            } else if d.is_nan() {
                0.0
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

fn layer(ctx: &Context) -> gpunorm::Result<BatchNorm> {
    let mut bn = BatchNorm::new(ctx, C, BatchNormConfig::torch_1d())?;
    bn.set_weight(Some(ctx.upload(&[1.5, -0.5, 2.0], &[C])?))?;
    bn.set_bias(Some(ctx.upload(&[0.1, 0.0, -1.0], &[C])?))?;
    Ok(bn)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let universe = mpi::initialize().ok_or("MPI is already initialized")?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let ctx = Context::new()?;

    // This rank's rows of the batch (as even a split as possible).
    let (from, to) = (rank * N / size, (rank + 1) * N / size);
    let rows = to - from;
    let x_all = batch(0x5eed, 100.0);
    let dy_all = batch(0xd1ce, 0.0);
    let shard = |v: &[f32]| v[from * C * L..to * C * L].to_vec();
    let x = ctx.upload(&shard(&x_all), &[rows, C, L])?;
    let dy = ctx.upload(&shard(&dy_all), &[rows, C, L])?;

    // Forward: local (count, mean, M2), all-gathered, merged with Chan's formula.
    let mut bn = layer(&ctx)?;
    let local = bn.replica_stats(&ctx, &x)?;
    let mut packed = vec![local.count];
    packed.extend(&local.mean);
    packed.extend(&local.m2);
    let mut gathered = vec![0.0f64; packed.len() * size];
    world.all_gather_into(&packed[..], &mut gathered[..]);
    let parts: Vec<ReplicaStats> = gathered
        .chunks(packed.len())
        .map(|p| ReplicaStats {
            count: p[0],
            mean: p[1..1 + C].to_vec(),
            m2: p[1 + C..].to_vec(),
            shift: vec![0.0; C],
        })
        .collect();
    let global = ReplicaStats::merge(&parts)?;
    let y = bn.forward_synced(&ctx, &x, &local, &global, Mode::Train)?;

    // Backward: (Σdy, Σdy·x̂) all-reduced.
    let sums = bn.replica_grad_sums(&ctx, &dy)?;
    let mut packed = vec![sums.count];
    packed.extend(&sums.sum_dy);
    packed.extend(&sums.sum_dy_xhat);
    let mut reduced = vec![0.0f64; packed.len()];
    world.all_reduce_into(&packed[..], &mut reduced[..], SystemOperation::sum());
    let total = ReplicaGradSums {
        count: reduced[0],
        sum_dy: reduced[1..1 + C].to_vec(),
        sum_dy_xhat: reduced[1 + C..].to_vec(),
    };
    let grads = bn.backward_synced(&ctx, &dy, &sums, &total)?;

    // The check: one BatchNorm over the whole batch, on this rank's device.
    let mut whole = layer(&ctx)?;
    let y_ref = whole.forward(&ctx, &ctx.upload(&x_all, &[N, C, L])?, Mode::Train)?;
    let g_ref = whole.backward(&ctx, &ctx.upload(&dy_all, &[N, C, L])?)?;
    let download = |t: &GpuTensor| ctx.download(t);
    let mut err = max_diff(&download(&y)?, &shard(&download(&y_ref)?));
    let (r, r_ref) = (
        bn.running_stats().ok_or("tracked")?,
        whole.running_stats().ok_or("tracked")?,
    );
    err = err.max(max_diff(&download(&r.mean)?, &download(&r_ref.mean)?));
    err = err.max(max_diff(&download(&r.var)?, &download(&r_ref.var)?));
    if r.num_batches_tracked(&ctx)? != r_ref.num_batches_tracked(&ctx)? {
        err = f64::INFINITY;
    }
    err = err.max(max_diff(
        &download(&grads.grad_input)?,
        &shard(&download(&g_ref.grad_input)?),
    ));
    // dγ and dβ are per replica (torch's rule); their sum is the whole batch's.
    for (mine, whole_grad) in [
        (&grads.grad_weight, &g_ref.grad_weight),
        (&grads.grad_bias, &g_ref.grad_bias),
    ] {
        let mine = download(mine.as_ref().ok_or("affine")?)?;
        let mut summed = vec![0.0f32; C];
        world.all_reduce_into(&mine[..], &mut summed[..], SystemOperation::sum());
        err = err.max(max_diff(
            &summed,
            &download(whole_grad.as_ref().ok_or("affine")?)?,
        ));
    }
    let mut worst = 0.0f64;
    world.all_reduce_into(&err, &mut worst, SystemOperation::max());
    if rank == 0 {
        println!(
            "adapter: {}",
            ctx.adapter().map(|a| a.name.as_str()).unwrap_or("?")
        );
        let verdict = if worst <= TOLERANCE { "ok" } else { "FAILED" };
        println!(
            "check: {size} ranks equal 1 rank on the concatenated batch [{N}, {C}, {L}] (forward, running stats, backward): max error {worst:.3e} (tolerance {TOLERANCE:e}): {verdict}"
        );
    }
    if worst <= TOLERANCE {
        Ok(())
    } else {
        Err("ranks disagree with the single-device BatchNorm".into())
    }
}
