//! Property tests: random small shapes, ops, conventions, affine and
//! tracking options and modes, forward and backward, against the f64 host
//! reference (`gpunorm::reference`, SPEC.md §2–4).
//!
//! Case counts are bounded so the file runs in seconds on lavapipe. The
//! seed is fixed so CI is reproducible; set `GPUNORM_PROPTEST_SEED` to any
//! number to explore other cases.

mod common;
use common::{assert_close, ctx, normal};
use gpunorm::{
    reference, Affine, BatchNorm, BatchNormConfig, Convention, Error, GpuTensor, Gradients,
    GroupNorm, GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, Mode, RmsNorm,
    RowNormConfig, View,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// Forward: SPEC.md §6's `1e-5 · (1 + |y64|)` for f32.
const FORWARD_TOL: f64 = 1e-5;
/// Backward: as tests/backward.rs (dx mixes sums of up to 2000 terms).
const BACKWARD_TOL: f64 = 1e-4;

fn config(cases: u32) -> ProptestConfig {
    let seed = std::env::var("GPUNORM_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0067_7075_6e6f_726d);
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    /// Channel axis 1 (torch, ONNX) or -1 (Keras, torch channels_last).
    Batch {
        channels_last: bool,
    },
    /// `normalized_shape` = the last `m` dims.
    Layer {
        m: usize,
    },
    Rms {
        m: usize,
    },
    Instance,
    Group {
        groups: usize,
    },
}

#[derive(Debug, Clone)]
struct Case {
    op: Op,
    shape: Vec<usize>,
    convention: Convention,
    weight: bool,
    bias: bool,
    track: bool,
    mode: Mode,
    eps: f32,
    momentum: Option<f32>,
    seed: u64,
    offset: f32,
    std: f32,
}

/// Raw draws, shaped into a valid case by [`Case::new`] (so shrinking works
/// on plain numbers).
#[allow(clippy::type_complexity)]
fn cases() -> impl Strategy<Value = Case> {
    (
        0usize..5,
        prop::collection::vec(1usize..=6, 2..=4),
        any::<[bool; 6]>(),
        (0usize..4, 0usize..4, 0.0f32..=1.0),
        any::<u64>(),
        (prop::sample::select(vec![0.0f32, 3.0, -50.0]), 0.25f32..4.0),
    )
        .prop_map(
            |(op, dims, flags, (sel, eps_sel, m), seed, (offset, std))| {
                Case::new(op, dims, flags, sel, eps_sel, m, seed, offset, std)
            },
        )
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        op: usize,
        mut shape: Vec<usize>,
        flags: [bool; 6],
        sel: usize,
        eps_sel: usize,
        momentum: f32,
        seed: u64,
        offset: f32,
        std: f32,
    ) -> Case {
        let rank = shape.len();
        let convention = if flags[0] {
            Convention::Keras
        } else {
            Convention::Torch
        };
        let op = match op {
            0 => Op::Batch {
                channels_last: flags[5],
            },
            1 => Op::Layer { m: 1 + sel % rank },
            2 => Op::Rms { m: 1 + sel % rank },
            3 => {
                if rank < 3 {
                    shape.push(1 + sel);
                }
                Op::Instance
            }
            _ => {
                let groups = 1 + sel % 3;
                let c = if convention == Convention::Keras {
                    rank - 1
                } else {
                    1
                };
                shape[c] = groups * (1 + shape[c] % 3);
                Op::Group { groups }
            }
        };
        // InstanceNorm is torch's alone; its convention is always torch.
        let convention = if op == Op::Instance {
            Convention::Torch
        } else {
            convention
        };
        let default_eps = match (op, convention) {
            (Op::Rms { .. }, Convention::Torch) => f32::EPSILON,
            (Op::Rms { .. }, Convention::Keras) => 1e-6,
            (_, Convention::Torch) => 1e-5,
            (_, Convention::Keras) => 1e-3,
        };
        let eps = [default_eps, default_eps, 1e-3, 0.25][eps_sel];
        let momentum = match (sel, convention) {
            (0, Convention::Torch) => None,
            (1, Convention::Torch) => Some(0.1),
            (1, Convention::Keras) => Some(0.99),
            _ => Some(momentum),
        };
        Case {
            op,
            shape,
            convention,
            weight: flags[1],
            bias: flags[2] && !matches!(op, Op::Rms { .. }),
            track: flags[3],
            mode: if flags[4] { Mode::Train } else { Mode::Eval },
            eps,
            momentum,
            seed,
            offset,
            std,
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn channel_axis(&self) -> usize {
        match self.op {
            Op::Batch {
                channels_last: true,
            } => self.shape.len() - 1,
            Op::Group { .. } if self.convention == Convention::Keras => self.shape.len() - 1,
            _ => 1,
        }
    }

    /// Length of γ and β.
    fn affine_len(&self) -> usize {
        match self.op {
            Op::Layer { m } | Op::Rms { m } => self.shape[self.shape.len() - m..].iter().product(),
            _ => self.shape[self.channel_axis()],
        }
    }

    fn has_running(&self) -> bool {
        self.track && matches!(self.op, Op::Batch { .. } | Op::Instance)
    }

    fn view(&self) -> View {
        match self.op {
            Op::Batch { .. } => View::batch_norm(&self.shape, self.channel_axis()),
            Op::Layer { .. } | Op::Rms { .. } => View::layer_norm(&self.shape, self.affine_len()),
            Op::Instance => View::instance_norm(&self.shape),
            Op::Group { groups } if self.convention == Convention::Keras => {
                View::group_norm_channels_last(&self.shape, groups)
            }
            Op::Group { groups } => View::group_norm(&self.shape, groups),
        }
    }

    /// Whether this forward normalizes with batch statistics.
    fn batch_stats(&self) -> bool {
        !self.has_running() || self.mode == Mode::Train
    }

    /// torch's "more than 1 value per channel" rule (SPEC.md §5).
    fn must_fail(&self) -> bool {
        let one_value = self.view().group_len() == 1;
        match self.op {
            Op::Batch { .. } => {
                self.convention == Convention::Torch && self.batch_stats() && one_value
            }
            Op::Instance => self.batch_stats() && one_value,
            _ => false,
        }
    }
}

/// Host copies of what a case feeds the layer.
struct Data {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
    dy: Vec<f32>,
}

impl Data {
    fn new(case: &Case) -> Data {
        let (n, c) = (case.numel(), case.affine_len());
        let s = case.seed;
        Data {
            x: normal(n, s, case.offset, case.std),
            w: normal(c, s ^ 1, 1.0, 0.5),
            b: normal(c, s ^ 2, 0.0, 0.5),
            rm: normal(c, s ^ 3, case.offset, 1.0),
            rv: normal(c, s ^ 4, 0.0, 1.0)
                .iter()
                .map(|z| 0.5 + z.abs())
                .collect(),
            dy: normal(n, s ^ 5, 0.0, 1.0),
        }
    }
}

const COUNT: i64 = 5;

/// A layer of any op, behind one interface for the properties.
enum Subject {
    Batch(BatchNorm),
    Row(LayerNorm),
    Rms(RmsNorm),
    Instance(InstanceNorm),
    Group(GroupNorm),
}

impl Subject {
    fn new(case: &Case, d: &Data) -> Subject {
        let ctx = ctx();
        let up = |v: &[f32]| ctx.upload(v, &[v.len()]).unwrap();
        let c = case.affine_len();
        let weight = case.weight.then(|| up(&d.w));
        let bias = case.bias.then(|| up(&d.b));
        let running = case.has_running().then(|| (up(&d.rm), up(&d.rv)));
        match case.op {
            Op::Batch { channels_last } => {
                let mut cfg = match case.convention {
                    Convention::Torch => BatchNormConfig::torch(),
                    Convention::Keras => BatchNormConfig::keras(),
                };
                cfg.axis = if channels_last { -1 } else { 1 };
                cfg.eps = case.eps;
                cfg.momentum = case.momentum;
                cfg.track_running_stats = case.track;
                let mut bn = BatchNorm::new(ctx, c, cfg).unwrap();
                bn.set_weight(weight).unwrap();
                bn.set_bias(bias).unwrap();
                if let Some((m, v)) = running {
                    let count = (case.convention == Convention::Torch).then_some(COUNT);
                    bn.set_running_stats(ctx, Some((m, v, count))).unwrap();
                }
                Subject::Batch(bn)
            }
            Op::Layer { .. } | Op::Rms { .. } => {
                let normalized = &case.shape[case.shape.len() - case.op_m()..];
                let cfg = RowNormConfig {
                    eps: case.eps,
                    weight: true,
                    bias: false,
                };
                if matches!(case.op, Op::Rms { .. }) {
                    let mut l = RmsNorm::new(ctx, normalized, cfg).unwrap();
                    l.set_weight(weight).unwrap();
                    Subject::Rms(l)
                } else {
                    let mut l = LayerNorm::new(ctx, normalized, cfg).unwrap();
                    l.set_weight(weight).unwrap();
                    l.set_bias(bias).unwrap();
                    Subject::Row(l)
                }
            }
            Op::Instance => {
                let cfg = InstanceNormConfig {
                    eps: case.eps,
                    momentum: case.momentum,
                    affine: false,
                    track_running_stats: case.track,
                    ..InstanceNormConfig::torch()
                };
                let mut l = InstanceNorm::new(ctx, c, cfg).unwrap();
                l.set_affine(Affine { weight, bias }).unwrap();
                if let Some((m, v)) = running {
                    l.set_running_stats(ctx, Some((m, v, Some(COUNT)))).unwrap();
                }
                Subject::Instance(l)
            }
            Op::Group { groups } => {
                let mut cfg = match case.convention {
                    Convention::Torch => GroupNormConfig::torch(),
                    Convention::Keras => GroupNormConfig::keras(),
                };
                cfg.eps = case.eps;
                let mut l = GroupNorm::new(ctx, groups, c, cfg).unwrap();
                l.set_affine(Affine { weight, bias }).unwrap();
                Subject::Group(l)
            }
        }
    }

    fn forward(&mut self, x: &GpuTensor, mode: Mode) -> gpunorm::Result<GpuTensor> {
        let ctx = ctx();
        match self {
            Subject::Batch(l) => l.forward(ctx, x, mode),
            Subject::Row(l) => l.forward(ctx, x, mode),
            Subject::Rms(l) => l.forward(ctx, x, mode),
            Subject::Instance(l) => l.forward(ctx, x, mode),
            Subject::Group(l) => l.forward(ctx, x),
        }
    }

    fn backward(&self, dy: &GpuTensor) -> gpunorm::Result<Gradients> {
        let ctx = ctx();
        match self {
            Subject::Batch(l) => l.backward(ctx, dy),
            Subject::Row(l) => l.backward(ctx, dy),
            Subject::Rms(l) => l.backward(ctx, dy),
            Subject::Instance(l) => l.backward(ctx, dy),
            Subject::Group(l) => l.backward(ctx, dy),
        }
    }

    /// (running mean, running var, counter) as downloaded.
    fn running(&self) -> Option<(Vec<f32>, Vec<f32>, Option<i64>)> {
        let ctx = ctx();
        let r = match self {
            Subject::Batch(l) => l.running_stats(),
            Subject::Instance(l) => l.running_stats(),
            _ => None,
        }?;
        Some((
            ctx.download(&r.mean).unwrap(),
            ctx.download(&r.var).unwrap(),
            r.num_batches_tracked(ctx).unwrap(),
        ))
    }
}

impl Case {
    fn op_m(&self) -> usize {
        match self.op {
            Op::Layer { m } | Op::Rms { m } => m,
            _ => 0,
        }
    }

    fn rms(&self) -> bool {
        matches!(self.op, Op::Rms { .. })
    }

    /// Running (mean, var) per stats group when the forward uses them.
    fn running_inputs<'a>(&self, d: &'a Data) -> Option<(&'a [f32], &'a [f32])> {
        (!self.batch_stats()).then_some((d.rm.as_slice(), d.rv.as_slice()))
    }

    /// The reference forward (SPEC.md §2), in f64.
    fn expected_y(&self, d: &Data) -> Vec<f64> {
        let view = self.view();
        let w = self.weight.then_some(d.w.as_slice());
        let b = self.bias.then_some(d.b.as_slice());
        match self.running_inputs(d) {
            None => reference::forward(&d.x, &view, self.rms(), self.eps as f64, w, b),
            Some((rm, rv)) => {
                // Running statistics of channel g serve every group (p, g).
                let stats: Vec<(f64, f64)> = (0..view.p)
                    .flat_map(|_| (0..view.g).map(|g| (rm[g] as f64, rv[g] as f64)))
                    .collect();
                reference::normalize(&d.x, &view, &stats, self.eps as f64, w, b)
            }
        }
    }

    /// Running statistics after a train forward (SPEC.md §3), in f64.
    fn expected_running(&self, d: &Data) -> (Vec<f64>, Vec<f64>, Option<i64>) {
        let (rm, rv) = (&d.rm, &d.rv);
        let view = self.view();
        let stats = reference::group_stats(&d.x, &view, false);
        let n = view.group_len() as f64;
        let c = self.affine_len();
        // Per channel: batch mean and (biased) variance, averaged over
        // instances for InstanceNorm.
        let mut mean = vec![0.0; c];
        let mut var = vec![0.0; c];
        for (i, &(m, v)) in stats.iter().enumerate() {
            mean[i % c] += m / view.p as f64;
            var[i % c] += v / view.p as f64;
        }
        let torch = self.convention == Convention::Torch;
        let unbias = if torch && n > 1.0 { n / (n - 1.0) } else { 1.0 };
        match (self.op, self.convention, self.momentum) {
            // momentum=None freezes InstanceNorm's running statistics.
            (Op::Instance, _, None) => (
                rm.iter().map(|&v| v as f64).collect(),
                rv.iter().map(|&v| v as f64).collect(),
                Some(COUNT),
            ),
            (Op::Instance, _, Some(mo)) => {
                let mo = mo as f64;
                let m = (0..c)
                    .map(|i| (1.0 - mo) * rm[i] as f64 + mo * mean[i])
                    .collect();
                let v = (0..c)
                    .map(|i| (1.0 - mo) * rv[i] as f64 + mo * var[i] * unbias)
                    .collect();
                (m, v, Some(COUNT))
            }
            (_, Convention::Torch, mo) => {
                let mo = mo.map_or(1.0 / (COUNT + 1) as f64, |m| m as f64);
                let m = (0..c)
                    .map(|i| (1.0 - mo) * rm[i] as f64 + mo * mean[i])
                    .collect();
                let v = (0..c)
                    .map(|i| (1.0 - mo) * rv[i] as f64 + mo * var[i] * unbias)
                    .collect();
                (m, v, Some(COUNT + 1))
            }
            (_, Convention::Keras, mo) => {
                let mo = mo.unwrap_or(0.99) as f64;
                let m = (0..c)
                    .map(|i| mo * rm[i] as f64 + (1.0 - mo) * mean[i])
                    .collect();
                let v = (0..c)
                    .map(|i| mo * rv[i] as f64 + (1.0 - mo) * var[i])
                    .collect();
                (m, v, None)
            }
        }
    }
}

fn download(t: &GpuTensor) -> Vec<f32> {
    ctx().download(t).unwrap()
}

/// Runs the case's forward; `None` when it failed as the rules say it must.
fn run_forward(case: &Case, d: &Data) -> Result<Option<(Subject, Vec<f32>)>, TestCaseError> {
    let x = ctx().upload(&d.x, &case.shape).unwrap();
    let mut layer = Subject::new(case, d);
    let before = layer.running();
    match layer.forward(&x, case.mode) {
        Err(e) => {
            prop_assert!(case.must_fail(), "unexpected error: {e}");
            prop_assert!(matches!(e, Error::Shape(_)), "{e}");
            prop_assert_eq!(layer.running(), before, "running stats changed on error");
            Ok(None)
        }
        Ok(y) => {
            prop_assert!(!case.must_fail(), "torch refuses this input");
            Ok(Some((layer, download(&y))))
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn forward_and_running_statistics_match_the_reference(case in cases()) {
        let d = Data::new(&case);
        let Some((layer, y)) = run_forward(&case, &d)? else { return Ok(()) };
        let want = case.expected_y(&d);
        let err = common::worst(&y, &want, FORWARD_TOL, FORWARD_TOL);
        prop_assert!(err <= 1.0, "forward: {}x the tolerance", err);
        if let Some((m, v, count)) = layer.running() {
            if case.mode == Mode::Train {
                let (wm, wv, wc) = case.expected_running(&d);
                assert_close("running mean", &m, &wm, 1e-5, 1e-5);
                assert_close("running var", &v, &wv, 1e-5, 1e-5);
                prop_assert_eq!(count, wc);
            } else {
                // Eval changes nothing, bit for bit.
                prop_assert_eq!(m, d.rm.clone());
                prop_assert_eq!(v, d.rv.clone());
                let wc = (case.convention == Convention::Torch || case.op == Op::Instance)
                    .then_some(COUNT);
                prop_assert_eq!(count, wc);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn backward_matches_the_reference(case in cases()) {
        let d = Data::new(&case);
        let Some((layer, _)) = run_forward(&case, &d)? else { return Ok(()) };
        let dy = ctx().upload(&d.dy, &case.shape).unwrap();
        let g = layer.backward(&dy).unwrap();
        let want = reference::backward(
            &d.x,
            &d.dy,
            &case.view(),
            case.rms(),
            case.eps as f64,
            case.weight.then_some(d.w.as_slice()),
            case.running_inputs(&d),
        );
        let dx = common::worst(&download(&g.grad_input), &want.grad_input, BACKWARD_TOL, BACKWARD_TOL);
        prop_assert!(dx <= 1.0, "grad_input: {}x the tolerance", dx);
        // Parameter gradients sum numel / affine_len terms each.
        let terms = (case.numel() / case.affine_len()).max(1) as f64;
        let atol = BACKWARD_TOL * terms.sqrt();
        prop_assert_eq!(g.grad_weight.is_some(), case.weight);
        prop_assert_eq!(g.grad_bias.is_some(), case.bias);
        if let Some(gw) = &g.grad_weight {
            let e = common::worst(&download(gw), &want.grad_weight, atol, BACKWARD_TOL);
            prop_assert!(e <= 1.0, "grad_weight: {}x the tolerance", e);
        }
        if let Some(gb) = &g.grad_bias {
            let e = common::worst(&download(gb), &want.grad_bias, atol, BACKWARD_TOL);
            prop_assert!(e <= 1.0, "grad_bias: {}x the tolerance", e);
        }
    }
}

/// Shapes the random search found to matter, pinned so every run checks
/// them: a group of exactly one vec4 (`[.., 4]`), one channel, one sample.
#[test]
fn fixed_small_shapes_match_the_reference() {
    for shape in [[1, 1, 4], [2, 1, 4], [1, 2, 4], [3, 1, 8], [1, 3, 5]] {
        for (op, track, mode, weight, bias) in [
            (
                Op::Batch {
                    channels_last: false,
                },
                true,
                Mode::Eval,
                false,
                true,
            ),
            (
                Op::Batch {
                    channels_last: false,
                },
                false,
                Mode::Eval,
                false,
                true,
            ),
            (
                Op::Batch {
                    channels_last: false,
                },
                true,
                Mode::Train,
                true,
                true,
            ),
            (Op::Instance, true, Mode::Eval, true, false),
            (Op::Instance, false, Mode::Train, false, false),
            (Op::Layer { m: 1 }, false, Mode::Train, true, true),
            (Op::Group { groups: 1 }, false, Mode::Train, true, true),
        ] {
            let case = Case {
                op,
                shape: shape.to_vec(),
                convention: Convention::Torch,
                weight,
                bias,
                track,
                mode,
                eps: 1e-5,
                momentum: Some(0.1),
                seed: 0,
                offset: 0.0,
                std: 0.25,
            };
            let d = Data::new(&case);
            let Some((_, y)) = run_forward(&case, &d).unwrap() else {
                continue;
            };
            assert_close(
                &format!("{case:?}"),
                &y,
                &case.expected_y(&d),
                FORWARD_TOL,
                FORWARD_TOL,
            );
        }
    }
}
