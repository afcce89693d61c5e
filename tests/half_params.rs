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
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
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
        let mut encoder = ctx
            .device()
            .create_command_encoder(&gpunorm::wgpu::CommandEncoderDescriptor { label: None });
        if param_dtype != DType::F32 {
            // f32 gradients for half parameters are refused before recording.
            let wrong = Gradients::zeros(ctx, &shape, dtype, &gn.affine().clone()).unwrap();
            let wrong = Gradients {
                grad_weight: Some(ctx.zeros(&[c], DType::F32).unwrap()),
                ..wrong
            };
            let e = gn
                .record_backward_into(ctx, &mut encoder, &dy, &wrong)
                .unwrap_err();
            assert!(matches!(e, Error::Dtype(_)), "{e}");
        }
        gn.record_backward_into(ctx, &mut encoder, &dy, &grads)
            .unwrap();
        ctx.queue().submit([encoder.finish()]);
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
    assert_eq!(
        out.get("bn.running_var").unwrap().dtype(),
        safetensors::Dtype::F32
    );
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
