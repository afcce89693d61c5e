//! Parameters, running statistics and parameter gradients stored as f16 or
//! bf16 (SPEC.md §5: the input's dtype or f32; §4: gradients in the
//! parameter's dtype). The engine works on f32 copies, so a layer with
//! half-precision tensors must give exactly what a layer with f32 tensors
//! of the same (widened) values gives, with what it writes back rounded
//! once to the half dtype.

mod common;
use common::{ctx, normal};
use gpunorm::state::Stateful;
use gpunorm::{
    BatchNorm, BatchNormConfig, Context, Convention, DType, Error, GpuTensor, Gradients, GroupNorm,
    GroupNormConfig, LayerNorm, Mode, RowNormConfig, StateDict,
};

const HALVES: [DType; 2] = [DType::F16, DType::BF16];

/// `values` stored as `dtype` and read back as f32 (what the device holds).
fn stored(values: &[f32], dtype: DType) -> Vec<f32> {
    gpunorm::tensor::decode(&gpunorm::tensor::encode(values, dtype), dtype)
}

/// The bits of `values` rounded once to `dtype`.
fn rounded_bits(values: &[f32], dtype: DType) -> Vec<u8> {
    gpunorm::tensor::encode(values, dtype)
}

fn bits(ctx: &Context, t: &GpuTensor) -> Vec<u8> {
    ctx.download_bytes(t).unwrap()
}

#[test]
fn layer_norm_with_half_parameters_matches_f32_parameters_of_the_same_values() {
    let ctx = ctx();
    // 7 columns: an odd length, so the last packed word of γ, β and their
    // gradients is half padding.
    let (rows, len) = (6, 7);
    for dtype in HALVES {
        let x = ctx
            .upload_as(&normal(rows * len, 1, 2.0, 3.0), &[rows, len], dtype)
            .unwrap();
        let dy = ctx
            .upload_as(&normal(rows * len, 2, 0.0, 1.0), &[rows, len], dtype)
            .unwrap();
        let gamma = stored(&normal(len, 3, 1.0, 0.5), dtype);
        let beta = stored(&normal(len, 4, 0.0, 0.5), dtype);
        let run = |param_dtype: DType| {
            let mut ln = LayerNorm::new(ctx, &[len], RowNormConfig::torch_layer_norm()).unwrap();
            ln.set_weight(Some(ctx.upload_as(&gamma, &[len], param_dtype).unwrap()))
                .unwrap();
            ln.set_bias(Some(ctx.upload_as(&beta, &[len], param_dtype).unwrap()))
                .unwrap();
            let y = ln.forward(ctx, &x, Mode::Train).unwrap();
            let g = ln.backward(ctx, &dy).unwrap();
            (y, g)
        };
        let (y32, g32) = run(DType::F32);
        let (y16, g16) = run(dtype);
        assert_eq!(bits(ctx, &y16), bits(ctx, &y32), "{dtype} output");
        assert_eq!(
            bits(ctx, &g16.grad_input),
            bits(ctx, &g32.grad_input),
            "{dtype} grad_input"
        );
        for (name, half, full) in [
            ("grad_weight", &g16.grad_weight, &g32.grad_weight),
            ("grad_bias", &g16.grad_bias, &g32.grad_bias),
        ] {
            let (half, full) = (half.as_ref().unwrap(), full.as_ref().unwrap());
            assert_eq!(half.dtype(), dtype, "{name} has the parameter's dtype");
            let want = rounded_bits(&ctx.download(full).unwrap(), dtype);
            assert_eq!(bits(ctx, half), want, "{dtype} {name}");
        }
    }
}

#[test]
fn batch_norm_running_statistics_in_half_precision_are_updated_rounded_once() {
    let ctx = ctx();
    let shape = [4, 3, 5, 5];
    for dtype in HALVES {
        let x = ctx
            .upload_as(&normal(300, 5, 1.0, 2.0), &shape, dtype)
            .unwrap();
        let mean0 = stored(&[0.25, -1.5, 3.0], dtype);
        let var0 = stored(&[1.0, 0.5, 2.0], dtype);
        let make = |param_dtype: DType| {
            let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d()).unwrap();
            bn.set_running_stats(
                ctx,
                Some((
                    ctx.upload_as(&mean0, &[3], param_dtype).unwrap(),
                    ctx.upload_as(&var0, &[3], param_dtype).unwrap(),
                    Some(7),
                )),
            )
            .unwrap();
            bn.set_weight(Some(
                ctx.upload_as(&stored(&[1.5, 0.5, -1.0], dtype), &[3], param_dtype)
                    .unwrap(),
            ))
            .unwrap();
            bn.set_bias(Some(
                ctx.upload_as(&stored(&[0.5, 0.0, 2.0], dtype), &[3], param_dtype)
                    .unwrap(),
            ))
            .unwrap();
            bn
        };
        let (mut full, mut half) = (make(DType::F32), make(dtype));
        let y32 = full.forward(ctx, &x, Mode::Train).unwrap();
        let y16 = half.forward(ctx, &x, Mode::Train).unwrap();
        assert_eq!(bits(ctx, &y16), bits(ctx, &y32), "{dtype} train output");
        let (r32, r16) = (full.running_stats().unwrap(), half.running_stats().unwrap());
        for (name, a, b) in [
            ("running_mean", &r16.mean, &r32.mean),
            ("running_var", &r16.var, &r32.var),
        ] {
            assert_eq!(a.dtype(), dtype, "{name} keeps its dtype");
            let want = rounded_bits(&ctx.download(b).unwrap(), dtype);
            assert_eq!(bits(ctx, a), want, "{dtype} {name}");
            assert_ne!(
                ctx.download(a).unwrap(),
                stored(
                    if name == "running_mean" {
                        &mean0
                    } else {
                        &var0
                    },
                    dtype
                ),
                "{dtype} {name} was updated"
            );
        }
        assert_eq!(r16.num_batches_tracked(ctx).unwrap(), Some(8));
        // Eval reads the narrowed statistics; the f32 layer gets the same
        // values, so the outputs agree bit for bit.
        full.set_running_stats(
            ctx,
            Some((
                ctx.upload(&ctx.download(&r16.mean).unwrap(), &[3]).unwrap(),
                ctx.upload(&ctx.download(&r16.var).unwrap(), &[3]).unwrap(),
                Some(8),
            )),
        )
        .unwrap();
        let before = bits(ctx, &half.running_stats().unwrap().mean);
        let e32 = full.forward(ctx, &x, Mode::Eval).unwrap();
        let e16 = half.forward(ctx, &x, Mode::Eval).unwrap();
        assert_eq!(bits(ctx, &e16), bits(ctx, &e32), "{dtype} eval output");
        assert_eq!(bits(ctx, &half.running_stats().unwrap().mean), before);
    }
}

#[test]
fn narrowing_keeps_the_padding_half_of_the_last_word() {
    // A running mean of 3 halves in a buffer the caller owns, with a
    // sentinel in the fourth half: the update must not touch it.
    let ctx = ctx();
    let usage = gpunorm::wgpu::BufferUsages::STORAGE
        | gpunorm::wgpu::BufferUsages::COPY_SRC
        | gpunorm::wgpu::BufferUsages::COPY_DST;
    let buffer = std::sync::Arc::new(ctx.device().create_buffer(
        &gpunorm::wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage,
            mapped_at_creation: false,
        },
    ));
    let sentinel = 0xbeefu16;
    let mut bytes = gpunorm::tensor::encode(&[0.0, 0.0, 0.0], DType::F16);
    bytes.extend(sentinel.to_le_bytes());
    bytes.resize(16, 0);
    ctx.queue().write_buffer(&buffer, 0, &bytes);
    let mean = GpuTensor::from_buffer(buffer.clone(), 0, &[3], DType::F16).unwrap();
    let var = ctx.upload_as(&[1.0; 3], &[3], DType::F16).unwrap();
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d().affine(false)).unwrap();
    bn.set_running_stats(ctx, Some((mean.clone(), var, Some(0))))
        .unwrap();
    let x = ctx
        .upload_as(&normal(24, 6, 4.0, 1.0), &[8, 3], DType::F16)
        .unwrap();
    bn.forward(ctx, &x, Mode::Train).unwrap();
    let whole = GpuTensor::from_buffer(buffer, 0, &[4], DType::F16).unwrap();
    let after = bits(ctx, &whole);
    assert_eq!(&after[6..8], &sentinel.to_le_bytes(), "padding half kept");
    assert!(ctx.download(&mean).unwrap().iter().all(|&m| m > 0.2));
}

#[test]
fn a_parameter_neither_f32_nor_the_inputs_dtype_is_refused_and_changes_nothing() {
    let ctx = ctx();
    let shape = [4, 3];
    for (input, param) in [
        (DType::F32, DType::F16),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::F16),
    ] {
        let x = ctx
            .upload_as(&normal(12, 7, 0.0, 1.0), &shape, input)
            .unwrap();
        let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
        let mean = ctx.upload_as(&[0.5; 3], &[3], param).unwrap();
        let var = ctx.upload(&[2.0; 3], &[3]).unwrap();
        bn.set_running_stats(ctx, Some((mean.clone(), var, Some(3))))
            .unwrap();
        let before = bits(ctx, &mean);
        let e = bn.forward(ctx, &x, Mode::Train).unwrap_err();
        assert!(matches!(e, Error::Dtype(_)), "{e}");
        assert!(e.to_string().contains("running_mean"), "{e}");
        assert_eq!(bits(ctx, &mean), before);
        let r = bn.running_stats().unwrap();
        assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(3));

        let mut ln = LayerNorm::new(ctx, &[3], RowNormConfig::torch_layer_norm()).unwrap();
        ln.set_weight(Some(ctx.upload_as(&[1.0; 3], &[3], param).unwrap()))
            .unwrap();
        let e = ln.forward(ctx, &x, Mode::Train).unwrap_err();
        assert!(matches!(e, Error::Dtype(_)), "{e}");
        assert!(e.to_string().contains("weight"), "{e}");
    }
}

#[test]
fn parameters_of_two_dtypes_are_refused_as_torch_refuses_them() {
    // torch: "expected scalar type Half but found Float" (f16 γ, f32 β), and
    // "mixed dtype (CPU): expect parameter to have scalar type of Float"
    // (f32 γ, f16 running statistics on an f16 input).
    let ctx = ctx();
    let x = ctx
        .upload_as(&normal(12, 13, 0.0, 1.0), &[4, 3], DType::F16)
        .unwrap();
    let mut ln = LayerNorm::new(ctx, &[3], RowNormConfig::torch_layer_norm()).unwrap();
    ln.set_weight(Some(ctx.upload_as(&[1.0; 3], &[3], DType::F16).unwrap()))
        .unwrap();
    let e = ln.forward(ctx, &x, Mode::Train).unwrap_err();
    assert!(matches!(e, Error::Dtype(_)), "{e}");
    assert!(e.to_string().contains("one dtype"), "{e}");

    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
    let mean = ctx.upload_as(&[0.5; 3], &[3], DType::F16).unwrap();
    let var = ctx.upload_as(&[2.0; 3], &[3], DType::F16).unwrap();
    bn.set_running_stats(ctx, Some((mean.clone(), var, Some(3))))
        .unwrap();
    let before = bits(ctx, &mean);
    let e = bn.forward(ctx, &x, Mode::Train).unwrap_err();
    assert!(e.to_string().contains("one dtype"), "{e}");
    assert_eq!(bits(ctx, &mean), before);
    let r = bn.running_stats().unwrap();
    assert_eq!(r.num_batches_tracked(ctx).unwrap(), Some(3));
    // All half, or all f32, is taken.
    bn.set_weight(Some(ctx.upload_as(&[1.0; 3], &[3], DType::F16).unwrap()))
        .unwrap();
    bn.set_bias(Some(ctx.upload_as(&[0.0; 3], &[3], DType::F16).unwrap()))
        .unwrap();
    bn.forward(ctx, &x, Mode::Train).unwrap();
}

#[test]
fn a_half_parameter_whose_f32_copy_outgrows_a_binding_is_too_large() {
    // The f16 γ fits one storage binding, its f32 working copy does not:
    // refused with a typed error before anything is recorded.
    let ctx = ctx();
    let len = (ctx.device().limits().max_storage_buffer_binding_size / 4) as usize + 64;
    let x = ctx.zeros(&[1, len], DType::F16).unwrap();
    let mut ln = LayerNorm::new(ctx, &[len], RowNormConfig::torch_rms_norm()).unwrap();
    ln.set_weight(Some(ctx.zeros(&[len], DType::F16).unwrap()))
        .unwrap();
    let y = ctx.zeros(&[1, len], DType::F16).unwrap();
    let mut encoder = ctx
        .device()
        .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
    let e = ln.record(ctx, &mut encoder, &x, &y).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    // The encoder holds nothing invalid.
    ctx.submit_and_wait(encoder).unwrap();
}

#[test]
fn backward_into_half_gradients_checks_their_dtype_and_narrows_them() {
    let ctx = ctx();
    let (n, c) = (2, 4);
    let shape = [n, c, 3, 3];
    let dtype = DType::F16;
    let x = ctx
        .upload_as(&normal(72, 8, 0.0, 1.0), &shape, dtype)
        .unwrap();
    let dy = ctx
        .upload_as(&normal(72, 9, 0.0, 1.0), &shape, dtype)
        .unwrap();
    let gamma = stored(&normal(c, 10, 1.0, 0.3), dtype);
    let run = |param_dtype: DType| {
        let mut gn = GroupNorm::new(ctx, 2, c, GroupNormConfig::torch()).unwrap();
        let affine = gpunorm::Affine {
            weight: Some(ctx.upload_as(&gamma, &[c], param_dtype).unwrap()),
            bias: Some(ctx.upload_as(&[0.0; 4], &[c], param_dtype).unwrap()),
        };
        gn.set_affine(affine.clone()).unwrap();
        gn.forward(ctx, &x).unwrap();
        let grads = Gradients::zeros(ctx, &shape, dtype, &affine).unwrap();
        let encoder = || {
            ctx.device()
                .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None })
        };
        if param_dtype != DType::F32 {
            // f32 gradients for half parameters are refused before
            // anything is recorded: the submitted encoder writes nothing.
            let sentinel = [7.0; 72];
            let wrong = Gradients {
                grad_input: ctx.upload_as(&sentinel, &shape, dtype).unwrap(),
                grad_weight: Some(ctx.upload(&sentinel[..c], &[c]).unwrap()),
                grad_bias: Some(ctx.upload_as(&sentinel[..c], &[c], dtype).unwrap()),
            };
            let mut refused = encoder();
            let e = gn
                .record_backward_into(ctx, &mut refused, &dy, &wrong)
                .unwrap_err();
            assert!(matches!(e, Error::Dtype(_)), "{e}");
            ctx.submit_and_wait(refused).unwrap();
            assert_eq!(ctx.download(&wrong.grad_input).unwrap(), sentinel);
            for g in [&wrong.grad_weight, &wrong.grad_bias] {
                assert_eq!(ctx.download(g.as_ref().unwrap()).unwrap(), sentinel[..c]);
            }
        }
        let mut e = encoder();
        gn.record_backward_into(ctx, &mut e, &dy, &grads).unwrap();
        ctx.queue().submit([e.finish()]);
        grads
    };
    let full = run(DType::F32);
    let half = run(dtype);
    assert_eq!(bits(ctx, &half.grad_input), bits(ctx, &full.grad_input));
    for (a, b) in [
        (&half.grad_weight, &full.grad_weight),
        (&half.grad_bias, &full.grad_bias),
    ] {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(a.dtype(), dtype);
        assert_eq!(bits(ctx, a), rounded_bits(&ctx.download(b).unwrap(), dtype));
    }
}

#[test]
fn state_loads_into_the_layers_dtype_and_exports_in_it() {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
    bn.set_weight(Some(ctx.upload_as(&[1.0; 3], &[3], DType::BF16).unwrap()))
        .unwrap();
    bn.set_running_stats(
        ctx,
        Some((
            ctx.upload_as(&[0.0; 3], &[3], DType::F16).unwrap(),
            ctx.upload(&[1.0; 3], &[3]).unwrap(),
            Some(0),
        )),
    )
    .unwrap();
    let values = [0.1f32, 1.0 / 3.0, 70000.0];
    let mut dict = StateDict::new();
    for name in ["weight", "bias", "running_mean", "running_var"] {
        dict.insert(
            format!("bn.{name}"),
            gpunorm::HostTensor::from_f32(&[3], &values).unwrap(),
        );
    }
    dict.insert("bn.num_batches_tracked", gpunorm::HostTensor::scalar_i64(5));
    bn.load_state(ctx, &dict, "bn", Convention::Torch).unwrap();
    let weight = bn.affine().weight.clone().unwrap();
    let r = bn.running_stats().unwrap();
    assert_eq!(weight.dtype(), DType::BF16);
    assert_eq!(bits(ctx, &weight), rounded_bits(&values, DType::BF16));
    assert_eq!(r.mean.dtype(), DType::F16);
    assert_eq!(bits(ctx, &r.mean), rounded_bits(&values, DType::F16));
    assert_eq!(r.var.dtype(), DType::F32);
    assert_eq!(ctx.download(&r.var).unwrap(), values);

    let mut out = StateDict::new();
    bn.save_state(ctx, &mut out, "bn", Convention::Torch)
        .unwrap();
    let weight = out.get("bn.weight").unwrap();
    assert_eq!(weight.dtype(), safetensors::Dtype::BF16);
    assert_eq!(weight.data(), rounded_bits(&values, DType::BF16));
    let mean = out.get("bn.running_mean").unwrap();
    assert_eq!(mean.dtype(), safetensors::Dtype::F16);
    assert_eq!(mean.data(), rounded_bits(&values, DType::F16));
    let var = out.get("bn.running_var").unwrap();
    assert_eq!(var.dtype(), safetensors::Dtype::F32);
    assert_eq!(var.data(), rounded_bits(&values, DType::F32));

    // An F16 file into a fresh (f32) layer: widened exactly, exported F32.
    let halves = gpunorm::HostTensor::new(
        safetensors::Dtype::F16,
        &[3],
        rounded_bits(&values, DType::F16),
    )
    .unwrap();
    let mut fresh = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
    let mut dict = out.clone();
    dict.insert("bn.weight", halves);
    fresh
        .load_state(ctx, &dict, "bn", Convention::Torch)
        .unwrap();
    let weight = fresh.affine().weight.clone().unwrap();
    assert_eq!(weight.dtype(), DType::F32);
    assert_eq!(ctx.download(&weight).unwrap(), stored(&values, DType::F16));
}

#[test]
fn sync_batch_norm_with_half_statistics_matches_a_local_batch_norm() {
    // One replica holding the whole batch is a BatchNorm: its half-precision
    // running statistics and gradients come out the same.
    let ctx = ctx();
    let shape = [4, 2, 3];
    let dtype = DType::BF16;
    let x = ctx
        .upload_as(&normal(24, 11, 1.0, 2.0), &shape, dtype)
        .unwrap();
    let dy = ctx
        .upload_as(&normal(24, 12, 0.0, 1.0), &shape, dtype)
        .unwrap();
    let make = || {
        let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
        bn.set_weight(Some(ctx.upload_as(&[1.5, -0.5], &[2], dtype).unwrap()))
            .unwrap();
        bn.set_bias(Some(ctx.upload_as(&[0.25, 1.0], &[2], dtype).unwrap()))
            .unwrap();
        bn.set_running_stats(
            ctx,
            Some((
                ctx.upload_as(&[0.0; 2], &[2], dtype).unwrap(),
                ctx.upload_as(&[1.0; 2], &[2], dtype).unwrap(),
                Some(0),
            )),
        )
        .unwrap();
        bn
    };
    let (mut local, mut synced) = (make(), make());
    let y = local.forward(ctx, &x, Mode::Train).unwrap();
    let g = local.backward(ctx, &dy).unwrap();
    let stats = synced.replica_stats(ctx, &x).unwrap();
    let global = gpunorm::ReplicaStats::merge(std::slice::from_ref(&stats)).unwrap();
    let ys = synced
        .forward_synced(ctx, &x, &stats, &global, Mode::Train)
        .unwrap();
    let sums = synced.replica_grad_sums(ctx, &dy).unwrap();
    let gs = synced.backward_synced(ctx, &dy, &sums, &sums).unwrap();
    let close = |a: &GpuTensor, b: &GpuTensor, what: &str| {
        assert_eq!(a.dtype(), b.dtype(), "{what}");
        for (u, v) in ctx
            .download(a)
            .unwrap()
            .iter()
            .zip(ctx.download(b).unwrap())
        {
            assert!(
                (u - v).abs() <= 0.02 * v.abs().max(1.0),
                "{what}: {u} vs {v}"
            );
        }
    };
    close(&ys, &y, "output");
    let (rs, rl) = (
        synced.running_stats().unwrap(),
        local.running_stats().unwrap(),
    );
    close(&rs.mean, &rl.mean, "running_mean");
    close(&rs.var, &rl.var, "running_var");
    close(&gs.grad_input, &g.grad_input, "grad_input");
    close(
        gs.grad_weight.as_ref().unwrap(),
        g.grad_weight.as_ref().unwrap(),
        "grad_weight",
    );
    assert_eq!(gs.grad_weight.as_ref().unwrap().dtype(), dtype);
}

#[test]
fn every_half_value_survives_widening_and_narrowing() {
    // Momentum 0 keeps the running statistics (old·1 + batch·0): every f16
    // and bf16 bit pattern goes through the widen and narrow casts and must
    // come back as itself (subnormals, ±inf and the largest finite values
    // included). −0 becomes +0 in the update's sum and NaN stays a NaN.
    let ctx = ctx();
    let channels = 1 << 16;
    let patterns: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for dtype in HALVES {
        let halves = |bytes: &[u8]| ctx.upload_bytes(bytes, &[channels], dtype).unwrap();
        let config = BatchNormConfig {
            momentum: Some(0.0),
            ..BatchNormConfig::torch_1d().affine(false)
        };
        let mut bn = BatchNorm::new(ctx, channels, config).unwrap();
        let (mean, var) = (halves(&patterns), halves(&patterns));
        bn.set_running_stats(ctx, Some((mean.clone(), var.clone(), Some(0))))
            .unwrap();
        let x = ctx.zeros(&[2, channels], dtype).unwrap();
        bn.forward(ctx, &x, Mode::Train).unwrap();
        let before = gpunorm::tensor::decode(&patterns, dtype);
        for t in [&mean, &var] {
            let after = ctx.download(t).unwrap();
            for (h, (a, b)) in after.iter().zip(&before).enumerate() {
                if b.is_nan() {
                    assert!(a.is_nan(), "{dtype} {h:#06x}: {a}");
                } else {
                    assert_eq!(a, b, "{dtype} {h:#06x}");
                    if *b != 0.0 {
                        assert_eq!(a.to_bits(), b.to_bits(), "{dtype} {h:#06x}");
                    }
                }
            }
        }
    }
}

/// One layer of every kind with its parameters (and running statistics) in
/// `param_dtype`, all holding the values `stored` gives in `dtype`.
enum AnyLayer {
    Batch(BatchNorm),
    Instance(gpunorm::InstanceNorm),
    Group(GroupNorm),
    Rms(gpunorm::RmsNorm),
}

impl AnyLayer {
    fn forward(&mut self, x: &GpuTensor) -> GpuTensor {
        let ctx = ctx();
        match self {
            AnyLayer::Batch(l) => l.forward(ctx, x, Mode::Train),
            AnyLayer::Instance(l) => l.forward(ctx, x, Mode::Train),
            AnyLayer::Group(l) => l.forward(ctx, x),
            AnyLayer::Rms(l) => l.forward(ctx, x, Mode::Train),
        }
        .unwrap()
    }

    fn backward(&self, dy: &GpuTensor) -> Gradients {
        let ctx = ctx();
        match self {
            AnyLayer::Batch(l) => l.backward(ctx, dy),
            AnyLayer::Instance(l) => l.backward(ctx, dy),
            AnyLayer::Group(l) => l.backward(ctx, dy),
            AnyLayer::Rms(l) => l.backward(ctx, dy),
        }
        .unwrap()
    }

    fn running(&self) -> Option<&gpunorm::RunningStats> {
        match self {
            AnyLayer::Batch(l) => l.running_stats(),
            AnyLayer::Instance(l) => l.running_stats(),
            _ => None,
        }
    }
}

#[test]
fn every_layer_kind_with_half_parameters_matches_f32_parameters() {
    // Keras BatchNormalization (channels-last, moving statistics), tracked
    // InstanceNorm, Keras GroupNormalization (channels-last) and RMSNorm:
    // the same bits as f32 parameters of the same values, and running
    // statistics and gradients rounded once from the f32 ones.
    let ctx = ctx();
    let shape = [2, 4, 4, 6];
    let c = 6;
    for dtype in HALVES {
        let values = |seed, mean| stored(&normal(c, seed, mean, 0.5), dtype);
        let (gamma, beta, mean, var) = (
            values(20, 1.0),
            values(21, 0.0),
            values(22, 0.0),
            values(23, 2.0),
        );
        let make = |kind: usize, p: DType| -> AnyLayer {
            let up = |v: &[f32]| ctx.upload_as(v, &[c], p).unwrap();
            let affine = gpunorm::Affine {
                weight: Some(up(&gamma)),
                bias: Some(up(&beta)),
            };
            match kind {
                0 => {
                    let mut l = BatchNorm::new(ctx, c, BatchNormConfig::keras()).unwrap();
                    l.set_weight(affine.weight).unwrap();
                    l.set_bias(affine.bias).unwrap();
                    l.set_running_stats(ctx, Some((up(&mean), up(&var), None)))
                        .unwrap();
                    AnyLayer::Batch(l)
                }
                1 => {
                    let config = gpunorm::InstanceNormConfig {
                        affine: true,
                        track_running_stats: true,
                        ..gpunorm::InstanceNormConfig::torch_2d()
                    };
                    // Channels-first: C = 4 here.
                    let cut = |v: &[f32]| ctx.upload_as(&v[..4], &[4], p).unwrap();
                    let mut l = gpunorm::InstanceNorm::new(ctx, 4, config).unwrap();
                    l.set_affine(gpunorm::Affine {
                        weight: Some(cut(&gamma)),
                        bias: Some(cut(&beta)),
                    })
                    .unwrap();
                    l.set_running_stats(ctx, Some((cut(&mean), cut(&var), Some(2))))
                        .unwrap();
                    AnyLayer::Instance(l)
                }
                2 => {
                    let mut l = GroupNorm::new(ctx, 3, c, GroupNormConfig::keras()).unwrap();
                    l.set_affine(affine).unwrap();
                    AnyLayer::Group(l)
                }
                _ => {
                    let mut l =
                        gpunorm::RmsNorm::new(ctx, &[c], RowNormConfig::torch_rms_norm()).unwrap();
                    l.set_weight(affine.weight).unwrap();
                    AnyLayer::Rms(l)
                }
            }
        };
        let x = ctx
            .upload_as(&normal(192, 24, 1.0, 2.0), &shape, dtype)
            .unwrap();
        let dy = ctx
            .upload_as(&normal(192, 25, 0.0, 1.0), &shape, dtype)
            .unwrap();
        for kind in 0..4 {
            let (mut full, mut half) = (make(kind, DType::F32), make(kind, dtype));
            let what = format!("{dtype} layer kind {kind}");
            let (y32, y16) = (full.forward(&x), half.forward(&x));
            assert_eq!(bits(ctx, &y16), bits(ctx, &y32), "{what}: output");
            let (g32, g16) = (full.backward(&dy), half.backward(&dy));
            assert_eq!(
                bits(ctx, &g16.grad_input),
                bits(ctx, &g32.grad_input),
                "{what}: grad_input"
            );
            let mut pairs = vec![(&g16.grad_weight, &g32.grad_weight)];
            if kind != 3 {
                pairs.push((&g16.grad_bias, &g32.grad_bias));
            }
            let running = match (half.running(), full.running()) {
                (Some(h), Some(f)) => vec![
                    (h.mean.clone(), f.mean.clone()),
                    (h.var.clone(), f.var.clone()),
                ],
                _ => Vec::new(),
            };
            assert_eq!(running.is_empty(), kind > 1, "{what}");
            let grads = pairs
                .into_iter()
                .map(|(h, f)| (h.clone().unwrap(), f.clone().unwrap()));
            for (h, f) in grads.chain(running) {
                assert_eq!(h.dtype(), dtype, "{what}");
                let want = rounded_bits(&ctx.download(&f).unwrap(), dtype);
                assert_eq!(bits(ctx, &h), want, "{what}");
            }
        }
    }
}
