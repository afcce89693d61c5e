//! Nothing lost on error (issue 9, item 4; SPEC.md §5): for every kind of
//! error, a BatchNorm's and an InstanceNorm's running statistics, counter
//! and parameters are bit-identical before and after the failing call, the
//! caller's output buffer is untouched, and the layer keeps working (its
//! last successful forward can still be differentiated).

mod common;
use std::sync::Arc;

use common::{assert_close, ctx, normal};
use gpunorm::state::{StateDict, Stateful};
use gpunorm::{
    reference, Affine, BatchNorm, BatchNormConfig, Context, ContextOptions, Convention, DType,
    Error, GpuTensor, InstanceNorm, InstanceNormConfig, Mode, View,
};

const C: usize = 3;
const SHAPE: [usize; 3] = [4, C, 5];

/// Everything a failing call must not touch, as raw bits.
#[derive(Debug, PartialEq)]
struct Snapshot {
    weight: Option<Vec<u32>>,
    bias: Option<Vec<u32>>,
    mean: Vec<u32>,
    var: Vec<u32>,
    count: Option<i64>,
}

fn bits(ctx: &Context, t: &GpuTensor) -> Vec<u32> {
    ctx.download(t)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// The two layers with running statistics, behind one interface.
enum Subject {
    Batch(BatchNorm),
    Instance(InstanceNorm),
}

impl Subject {
    /// Both kinds with random γ, β and running statistics, after one train
    /// forward, so every buffer holds something worth losing.
    fn all(ctx: &Context) -> Vec<Subject> {
        let up = |v: Vec<f32>| ctx.upload(&v, &[C]).unwrap();
        let mut bn = BatchNorm::new(ctx, C, BatchNormConfig::torch()).unwrap();
        bn.set_weight(Some(up(normal(C, 1, 1.0, 0.5)))).unwrap();
        bn.set_bias(Some(up(normal(C, 2, 0.0, 0.5)))).unwrap();
        bn.set_running_stats(
            ctx,
            Some((up(normal(C, 3, 0.0, 1.0)), up(vec![0.5, 1.5, 2.5]), Some(9))),
        )
        .unwrap();
        let config = InstanceNormConfig {
            affine: true,
            track_running_stats: true,
            ..InstanceNormConfig::torch()
        };
        let mut inorm = InstanceNorm::new(ctx, C, config).unwrap();
        inorm
            .set_affine(Affine {
                weight: Some(up(normal(C, 4, 1.0, 0.5))),
                bias: Some(up(normal(C, 5, 0.0, 0.5))),
            })
            .unwrap();
        inorm
            .set_running_stats(
                ctx,
                Some((up(normal(C, 6, 0.0, 1.0)), up(vec![2.0, 1.0, 0.5]), Some(9))),
            )
            .unwrap();
        let mut subjects = vec![Subject::Batch(bn), Subject::Instance(inorm)];
        let x = ctx.upload(&input(), &SHAPE).unwrap();
        for s in &mut subjects {
            s.forward(ctx, &x, Mode::Train).unwrap();
        }
        subjects
    }

    fn name(&self) -> &'static str {
        match self {
            Subject::Batch(_) => "BatchNorm",
            Subject::Instance(_) => "InstanceNorm",
        }
    }

    fn affine(&self) -> &Affine {
        match self {
            Subject::Batch(l) => l.affine(),
            Subject::Instance(l) => l.affine(),
        }
    }

    fn running(&self) -> &gpunorm::RunningStats {
        match self {
            Subject::Batch(l) => l.running_stats(),
            Subject::Instance(l) => l.running_stats(),
        }
        .expect("tracked")
    }

    fn snapshot(&self, ctx: &Context) -> Snapshot {
        let a = self.affine();
        let r = self.running();
        Snapshot {
            weight: a.weight.as_ref().map(|t| bits(ctx, t)),
            bias: a.bias.as_ref().map(|t| bits(ctx, t)),
            mean: bits(ctx, &r.mean),
            var: bits(ctx, &r.var),
            count: r.num_batches_tracked(ctx).unwrap(),
        }
    }

    fn forward(&mut self, ctx: &Context, x: &GpuTensor, mode: Mode) -> gpunorm::Result<GpuTensor> {
        match self {
            Subject::Batch(l) => l.forward(ctx, x, mode),
            Subject::Instance(l) => l.forward(ctx, x, mode),
        }
    }

    fn record(
        &mut self,
        ctx: &Context,
        x: &GpuTensor,
        y: &GpuTensor,
        mode: Mode,
    ) -> gpunorm::Result<()> {
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        let recorded = match self {
            Subject::Batch(l) => l.record(ctx, &mut encoder, x, y, mode),
            Subject::Instance(l) => l.record(ctx, &mut encoder, x, y, mode),
        };
        // Submitted even after an error: whatever a failed record left in
        // the encoder runs, so the snapshot sees it.
        ctx.submit_and_wait(encoder)?;
        recorded.map(drop)
    }

    fn set_weight(&mut self, w: GpuTensor) -> gpunorm::Result<()> {
        match self {
            Subject::Batch(l) => l.set_weight(Some(w)),
            Subject::Instance(l) => l.set_affine(Affine {
                weight: Some(w),
                bias: l.affine().bias.clone(),
            }),
        }
    }

    fn set_running_stats(
        &mut self,
        ctx: &Context,
        stats: (GpuTensor, GpuTensor, Option<i64>),
    ) -> gpunorm::Result<()> {
        match self {
            Subject::Batch(l) => l.set_running_stats(ctx, Some(stats)),
            Subject::Instance(l) => l.set_running_stats(ctx, Some(stats)),
        }
    }

    fn backward(&self, ctx: &Context, dy: &GpuTensor) -> gpunorm::Result<gpunorm::Gradients> {
        match self {
            Subject::Batch(l) => l.backward(ctx, dy),
            Subject::Instance(l) => l.backward(ctx, dy),
        }
    }

    fn view(&self) -> View {
        match self {
            Subject::Batch(_) => View::batch_norm(&SHAPE, 1),
            Subject::Instance(_) => View::instance_norm(&SHAPE),
        }
    }

    fn load_state(&mut self, ctx: &Context, state: &StateDict) -> gpunorm::Result<()> {
        match self {
            Subject::Batch(l) => l.load_state(ctx, state, "", Convention::Torch),
            Subject::Instance(l) => l.load_state(ctx, state, "", Convention::Torch),
        }
    }

    fn state(&self, ctx: &Context) -> StateDict {
        match self {
            Subject::Batch(l) => l.state(ctx, Convention::Torch),
            Subject::Instance(l) => l.state(ctx, Convention::Torch),
        }
        .unwrap()
    }
}

fn input() -> Vec<f32> {
    normal(SHAPE.iter().product(), 7, 2.0, 3.0)
}

/// Runs `call` on every subject, checks it fails with an error `kind`
/// accepts and that nothing changed; then checks the subject still
/// differentiates its last successful forward and still runs.
fn fails_changing_nothing(
    what: &str,
    ctx: &Context,
    kind: impl Fn(&Error) -> bool,
    mut call: impl FnMut(&mut Subject) -> gpunorm::Result<()>,
) {
    for mut s in Subject::all(ctx) {
        let before = s.snapshot(ctx);
        let err = call(&mut s).expect_err(what);
        assert!(
            kind(&err),
            "{} {what}: unexpected error kind: {err:?}",
            s.name()
        );
        assert_eq!(
            s.snapshot(ctx),
            before,
            "{} {what}: state changed after {err}",
            s.name()
        );
        still_works(ctx, &mut s, what);
        assert_eq!(
            s.snapshot(ctx),
            before,
            "{} {what}: backward changed state",
            s.name()
        );
    }
}

/// The saved statistics of the setup's train forward survive the failure:
/// the backward still matches the reference for that forward's input.
fn still_works(ctx: &Context, s: &mut Subject, what: &str) {
    let dy_host = normal(SHAPE.iter().product(), 8, 0.0, 1.0);
    let dy = ctx.upload(&dy_host, &SHAPE).unwrap();
    let g = s.backward(ctx, &dy).unwrap();
    let weight = ctx.download(s.affine().weight.as_ref().unwrap()).unwrap();
    let want = reference::backward(
        &input(),
        &dy_host,
        &s.view(),
        false,
        1e-5,
        Some(&weight),
        None,
    );
    assert_close(
        &format!("{} after {what}: grad_input", s.name()),
        &ctx.download(&g.grad_input).unwrap(),
        &want.grad_input,
        1e-4,
        1e-4,
    );
}

fn is_shape(e: &Error) -> bool {
    matches!(e, Error::Shape(_))
}

#[test]
fn a_channel_count_mismatch_changes_nothing() {
    let ctx = ctx();
    for mode in [Mode::Train, Mode::Eval] {
        let x = ctx.upload(&normal(40, 1, 0.0, 1.0), &[2, 4, 5]).unwrap();
        fails_changing_nothing("channel mismatch", ctx, is_shape, |s| {
            s.forward(ctx, &x, mode).map(drop)
        });
    }
}

#[test]
fn a_wrong_rank_changes_nothing() {
    let ctx = ctx();
    let x = ctx.upload(&[1.0; C], &[C]).unwrap();
    fails_changing_nothing("rank 1", ctx, is_shape, |s| {
        s.forward(ctx, &x, Mode::Train).map(drop)
    });
}

#[test]
fn one_value_per_channel_in_train_mode_changes_nothing() {
    let ctx = ctx();
    // BatchNorm: N·S = 1; InstanceNorm: S = 1.
    let x = ctx.upload(&[1.0, 2.0, 3.0], &[1, C, 1]).unwrap();
    fails_changing_nothing("one value per channel", ctx, is_shape, |s| {
        s.forward(ctx, &x, Mode::Train).map(drop)
    });
}

#[test]
fn a_parameter_of_the_wrong_length_changes_nothing() {
    let ctx = ctx();
    fails_changing_nothing("weight of 4", ctx, is_shape, |s| {
        s.set_weight(ctx.upload(&[1.0; 4], &[4]).unwrap())
    });
    fails_changing_nothing("running_var of 2", ctx, is_shape, |s| {
        let mean = ctx.upload(&[0.0; C], &[C]).unwrap();
        let var = ctx.upload(&[1.0; 2], &[2]).unwrap();
        s.set_running_stats(ctx, (mean, var, Some(1)))
    });
}

#[test]
fn a_parameter_of_the_wrong_dtype_changes_nothing() {
    let ctx = ctx();
    let is_dtype = |e: &Error| matches!(e, Error::Dtype(_));
    // A half-precision weight is taken (SPEC.md §5: f32 or the input's
    // dtype), and a forward of an f32 input refuses it before recording.
    let x = ctx.upload(&input(), &SHAPE).unwrap();
    fails_changing_nothing("f32 input, f16 weight", ctx, is_dtype, |s| {
        let original = s.affine().weight.clone().expect("affine");
        s.set_weight(ctx.upload_as(&[1.0; C], &[C], DType::F16).unwrap())?;
        let refused = s.forward(ctx, &x, Mode::Train).map(drop);
        s.set_weight(original)?;
        refused
    });
    fails_changing_nothing("i64 weight in a state file", ctx, is_dtype, |s| {
        let mut state = s.state(ctx);
        state.insert(
            "weight",
            gpunorm::HostTensor::from_i64(&[C], &[1, 2, 3]).unwrap(),
        );
        s.load_state(ctx, &state)
    });
}

#[test]
fn an_output_or_grad_output_of_another_dtype_changes_nothing() {
    let ctx = ctx();
    let x = ctx.upload(&input(), &SHAPE).unwrap();
    let is_dtype = |e: &Error| matches!(e, Error::Dtype(_));
    fails_changing_nothing("f16 output", ctx, is_dtype, |s| {
        let y = ctx.zeros(&SHAPE, DType::F16).unwrap();
        s.record(ctx, &x, &y, Mode::Train)
    });
    fails_changing_nothing("f16 grad_output", ctx, is_dtype, |s| {
        let dy = ctx.upload_as(&input(), &SHAPE, DType::F16).unwrap();
        s.backward(ctx, &dy).map(drop)
    });
}

#[test]
fn invalid_eps_or_momentum_at_construction_is_refused_and_touches_no_layer() {
    let ctx = ctx();
    let is_arg = |e: &Error| matches!(e, Error::InvalidArgument(_));
    for eps in [-1e-5, f32::NAN, f32::INFINITY] {
        fails_changing_nothing(&format!("eps {eps}"), ctx, is_arg, |s| match s {
            Subject::Batch(_) => {
                let mut cfg = BatchNormConfig::torch();
                cfg.eps = eps;
                BatchNorm::new(ctx, C, cfg).map(drop)
            }
            Subject::Instance(_) => {
                let cfg = InstanceNormConfig {
                    eps,
                    ..InstanceNormConfig::torch()
                };
                InstanceNorm::new(ctx, C, cfg).map(drop)
            }
        });
    }
    for momentum in [2.0, -0.1, f32::NAN] {
        fails_changing_nothing(&format!("momentum {momentum}"), ctx, is_arg, |s| match s {
            Subject::Batch(_) => {
                let mut cfg = BatchNormConfig::torch();
                cfg.momentum = Some(momentum);
                BatchNorm::new(ctx, C, cfg).map(drop)
            }
            Subject::Instance(_) => {
                let cfg = InstanceNormConfig {
                    momentum: Some(momentum),
                    ..InstanceNormConfig::torch()
                };
                InstanceNorm::new(ctx, C, cfg).map(drop)
            }
        });
    }
}

#[test]
fn partial_running_state_changes_nothing() {
    let ctx = ctx();
    let is_state = |e: &Error| matches!(e, Error::State(_));
    fails_changing_nothing("stats without counter", ctx, is_state, |s| {
        let mean = ctx.upload(&[0.0; C], &[C]).unwrap();
        let var = ctx.upload(&[1.0; C], &[C]).unwrap();
        s.set_running_stats(ctx, (mean, var, None))
    });
    fails_changing_nothing(
        "file: running_mean without running_var",
        ctx,
        is_state,
        |s| {
            let mut state = s.state(ctx);
            state.remove("running_var");
            s.load_state(ctx, &state)
        },
    );
    fails_changing_nothing("file: no num_batches_tracked", ctx, is_state, |s| {
        let mut state = s.state(ctx);
        state.remove("num_batches_tracked");
        s.load_state(ctx, &state)
    });
}

#[test]
fn a_tensor_too_large_for_the_device_changes_nothing() {
    // A context that pretends buffers hold at most 4 KiB; the input lives in
    // a buffer made directly on the device, as an application's would.
    let small = Context::with_options(ContextOptions {
        max_buffer_size: Some(4096),
        ..Default::default()
    })
    .unwrap();
    let shape = [8, C, 64];
    let n: usize = shape.iter().product();
    let raw = |label| {
        let buffer = small
            .device()
            .create_buffer(&gpunorm::wgpu::BufferDescriptor {
                label: Some(label),
                size: (n * 4) as u64,
                usage: gpunorm::wgpu::BufferUsages::STORAGE
                    | gpunorm::wgpu::BufferUsages::COPY_SRC
                    | gpunorm::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
        GpuTensor::from_buffer(Arc::new(buffer), 0, &shape, DType::F32).unwrap()
    };
    let x = raw("x");
    small
        .queue()
        .write_buffer(x.buffer(), 0, bytemuck::cast_slice(&normal(n, 3, 1.0, 1.0)));
    let is_too_large = |e: &Error| matches!(e, Error::TooLarge { .. });
    for mode in [Mode::Train, Mode::Eval] {
        fails_changing_nothing("too large (forward)", &small, is_too_large, |s| {
            s.forward(&small, &x, mode).map(drop)
        });
        let y = raw("y");
        fails_changing_nothing("too large (record)", &small, is_too_large, |s| {
            s.record(&small, &x, &y, mode)
        });
    }
}

#[test]
fn a_buffer_without_storage_usage_cannot_be_wrapped() {
    let ctx = ctx();
    let buffer = ctx
        .device()
        .create_buffer(&gpunorm::wgpu::BufferDescriptor {
            label: None,
            size: 256,
            usage: gpunorm::wgpu::BufferUsages::COPY_SRC | gpunorm::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
    let err = GpuTensor::from_buffer(std::sync::Arc::new(buffer), 0, &[C], DType::F32).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("STORAGE"),
        "{err}"
    );
}

#[test]
fn an_output_aliasing_the_input_or_the_state_changes_nothing() {
    let ctx = ctx();
    let is_arg = |e: &Error| matches!(e, Error::InvalidArgument(_));
    let x = ctx.upload(&input(), &SHAPE).unwrap();
    fails_changing_nothing("output = input", ctx, is_arg, |s| {
        s.record(ctx, &x, &x, Mode::Train)
    });
    // The same buffer through another handle: a clone of the wgpu buffer in
    // its own Arc, as an application wrapping an arena twice would make.
    fails_changing_nothing("output = input, cloned handle", ctx, is_arg, |s| {
        let y = GpuTensor::from_buffer(
            std::sync::Arc::new((**x.buffer()).clone()),
            0,
            &SHAPE,
            DType::F32,
        )
        .unwrap();
        s.record(ctx, &x, &y, Mode::Train)
    });
    let before_x = bits(ctx, &x);
    // An output that shares its buffer with the running mean: the mean sits
    // at the front, the output at the next aligned offset.
    let align = ctx.storage_offset_alignment() as usize;
    let numel: usize = SHAPE.iter().product();
    let sentinel = vec![-7.5f32; align / 4 + numel];
    fails_changing_nothing(
        "output shares the running mean's buffer",
        ctx,
        is_arg,
        |s| {
            let shared = ctx.upload(&sentinel, &[sentinel.len()]).unwrap();
            let buffer = shared.buffer().clone();
            let mean = GpuTensor::from_buffer(buffer.clone(), 0, &[C], DType::F32).unwrap();
            let y = GpuTensor::from_buffer(buffer, align as u64, &SHAPE, DType::F32).unwrap();
            let var = ctx.upload(&[1.0; C], &[C]).unwrap();
            // Installing the shared mean is a change of its own; the original
            // values are put back after the failing call, and the snapshot
            // compares values.
            let original = s.snapshot(ctx);
            let (m, v) = (
                ctx.upload(&from_bits(&original.mean), &[C]).unwrap(),
                ctx.upload(&from_bits(&original.var), &[C]).unwrap(),
            );
            s.set_running_stats(ctx, (mean, var, original.count))
                .unwrap();
            let result = s.record(ctx, &x, &y, Mode::Train);
            assert_eq!(
                bits(ctx, &shared),
                sentinel.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "the shared buffer was written"
            );
            s.set_running_stats(ctx, (m, v, original.count)).unwrap();
            result
        },
    );
    fails_changing_nothing("output = weight's buffer", ctx, is_arg, |s| {
        // γ's C floats seen as a [1, C, 1] output for a [1, C, 1] input
        // (eval mode uses the running statistics, so one value is fine).
        let w = s.affine().weight.clone().unwrap();
        let y =
            GpuTensor::from_buffer(w.buffer().clone(), w.offset(), &[1, C, 1], DType::F32).unwrap();
        let x = ctx.upload(&[1.0, 2.0, 3.0], &[1, C, 1]).unwrap();
        s.record(ctx, &x, &y, Mode::Eval)
    });
    assert_eq!(bits(ctx, &x), before_x, "the input was written");
}

fn from_bits(b: &[u32]) -> Vec<f32> {
    b.iter().map(|&v| f32::from_bits(v)).collect()
}

#[test]
fn tensors_of_another_context_are_refused_and_change_nothing() {
    let ctx = ctx();
    let other = Context::new().unwrap();
    let foreign = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        other.upload(&normal(n, 11, 0.0, 1.0), shape).unwrap()
    };
    let is_arg =
        |e: &Error| matches!(e, Error::InvalidArgument(m) if m.contains("another Context"));
    let x = ctx.upload(&input(), &SHAPE).unwrap();
    for mode in [Mode::Train, Mode::Eval] {
        fails_changing_nothing("input of another context", ctx, is_arg, |s| {
            s.forward(ctx, &foreign(&SHAPE), mode).map(drop)
        });
        fails_changing_nothing("output of another context", ctx, is_arg, |s| {
            s.record(ctx, &x, &foreign(&SHAPE), mode)
        });
        // The layer's parameters and statistics live on `ctx`.
        fails_changing_nothing("layer run on another context", ctx, is_arg, |s| {
            s.forward(&other, &foreign(&SHAPE), mode).map(drop)
        });
    }
    fails_changing_nothing("grad_output of another context", ctx, is_arg, |s| {
        s.backward(ctx, &foreign(&SHAPE)).map(drop)
    });
    fails_changing_nothing("backward on another context", ctx, is_arg, |s| {
        s.backward(&other, &foreign(&SHAPE)).map(drop)
    });
    fails_changing_nothing("running stats of another context", ctx, is_arg, |s| {
        s.set_running_stats(ctx, (foreign(&[C]), foreign(&[C]), Some(1)))
    });
    fails_changing_nothing("counter read on another context", ctx, is_arg, |s| {
        s.running().num_batches_tracked(&other).map(drop)
    });
    let is_download = |e: &Error| matches!(e, Error::InvalidArgument(m) if m.contains("download"));
    assert!(is_download(&other.download(&x).unwrap_err()));
}

#[test]
fn a_wrapped_buffer_of_another_context_is_a_wgpu_error_that_changes_nothing() {
    // A wrapped buffer carries no owner the crate could check; wgpu sees the
    // device mismatch (the contexts share one instance), and the layer puts
    // its saved forward back.
    let ctx = ctx();
    let other = Context::new().unwrap();
    let n: usize = SHAPE.iter().product();
    let there = other.upload(&normal(n, 12, 0.0, 1.0), &SHAPE).unwrap();
    let wrapped = GpuTensor::from_buffer(there.buffer().clone(), 0, &SHAPE, DType::F32).unwrap();
    let is_wgpu = |e: &Error| matches!(e, Error::Wgpu(_));
    for mode in [Mode::Train, Mode::Eval] {
        fails_changing_nothing("wrapped input of another device", ctx, is_wgpu, |s| {
            s.forward(ctx, &wrapped, mode).map(drop)
        });
    }
    assert!(is_wgpu(&ctx.download(&wrapped).unwrap_err()));
}
