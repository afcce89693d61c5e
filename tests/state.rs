//! State import and export (SPEC.md §7): bit-exact round trips for every
//! layer under both naming conventions, checkpoints written by real torch
//! and Keras (tests/fixtures/state/generate.py) reproducing the frameworks'
//! outputs, and loads that fail leaving the layer unchanged.

mod common;
use std::path::PathBuf;

use common::{assert_close, ctx, normal};
use gpunorm::state::{HostTensor, StateDict, Stateful};
use gpunorm::{
    Affine, BatchNorm, BatchNormConfig, Convention, Error, GroupNorm, GroupNormConfig,
    InstanceNorm, InstanceNormConfig, LayerNorm, Mode, RmsNorm, RowNormConfig,
};

const BOTH: [Convention; 2] = [Convention::Torch, Convention::Keras];

fn fixture(name: &str) -> StateDict {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state");
    StateDict::load(path.join(name)).expect("fixture (run tests/fixtures/state/generate.py)")
}

fn floats(dict: &StateDict, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = dict
        .get(name)
        .unwrap_or_else(|| panic!("{name} in fixture"));
    (t.to_f32().unwrap(), t.shape().to_vec())
}

/// An F64 tensor of a fixture, unrounded.
fn wide(dict: &StateDict, name: &str) -> Vec<f64> {
    let t = dict
        .get(name)
        .unwrap_or_else(|| panic!("{name} in fixture"));
    assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Values no arithmetic would produce by accident: signed zero, a
/// subnormal, the f32 extremes and a NaN with a payload.
fn odd_values(n: usize, seed: u64) -> Vec<f32> {
    let special = [
        -0.0f32,
        f32::from_bits(1),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(0x7fc0_1234),
    ];
    normal(n, seed, 0.5, 2.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| if i < special.len() { special[i] } else { v })
        .collect()
}

fn upload(values: &[f32]) -> gpunorm::GpuTensor {
    ctx().upload(values, &[values.len()]).unwrap()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gpunorm-state-{}-{name}", std::process::id()))
}

/// Exports `a`, writes the file, reads it back, loads it into `b` and
/// checks `b` exports the very same bytes.
fn round_trip<L: Stateful>(what: &str, a: &L, b: &mut L, convention: Convention) -> StateDict {
    let ctx = ctx();
    let state = a.state(ctx, convention).unwrap();
    let path = temp_path(&format!("{what}-{convention:?}.safetensors"));
    state.save(&path).unwrap();
    let read = StateDict::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(read, state, "{what}: the file holds what was saved");
    b.load_state(ctx, &read, "", convention).unwrap();
    assert_eq!(
        b.state(ctx, convention).unwrap(),
        state,
        "{what} ({convention:?}): loaded state differs"
    );
    state
}

fn bits(t: &HostTensor) -> Vec<u32> {
    t.to_f32().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn assert_bits(state: &StateDict, name: &str, expected: &[f32]) {
    let want: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
    let t = state.get(name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(
        t.dtype(),
        safetensors::Dtype::F32,
        "{name} is written as F32"
    );
    assert_eq!(bits(t), want, "{name}");
}

#[test]
fn batch_norm_state_round_trips_bit_exactly_under_both_conventions() {
    let ctx = ctx();
    for (layer_convention, config) in [
        (Convention::Torch, BatchNormConfig::torch_2d()),
        (Convention::Keras, BatchNormConfig::keras()),
    ] {
        for names in BOTH {
            let (w, b, m, v) = (
                odd_values(4, 1),
                odd_values(4, 2),
                odd_values(4, 3),
                odd_values(4, 4),
            );
            let mut a = BatchNorm::new(ctx, 4, config.clone()).unwrap();
            a.set_weight(Some(upload(&w))).unwrap();
            a.set_bias(Some(upload(&b))).unwrap();
            let count = (layer_convention == Convention::Torch).then_some(12_345_678_901i64);
            a.set_running_stats(ctx, Some((upload(&m), upload(&v), count)))
                .unwrap();
            let mut fresh = BatchNorm::new(ctx, 4, config.clone()).unwrap();
            let state = round_trip("batch_norm", &a, &mut fresh, names);
            let n = match names {
                Convention::Torch => ["weight", "bias", "running_mean", "running_var"],
                Convention::Keras => ["gamma", "beta", "moving_mean", "moving_variance"],
            };
            for (name, values) in n.iter().zip([&w, &b, &m, &v]) {
                assert_bits(&state, name, values);
            }
            let counter = state.get("num_batches_tracked");
            match (names, count) {
                (Convention::Torch, Some(c)) => {
                    let t = counter.unwrap();
                    assert_eq!((t.dtype(), t.shape()), (safetensors::Dtype::I64, &[][..]));
                    assert_eq!(t.to_i64().unwrap(), vec![c]);
                    assert_eq!(
                        fresh.running_stats().unwrap().num_batches_tracked(ctx),
                        Ok(Some(c))
                    );
                }
                // A Keras-convention layer has no counter; torch names get 0.
                (Convention::Torch, None) => {
                    assert_eq!(counter.unwrap().to_i64().unwrap(), vec![0])
                }
                (Convention::Keras, _) => assert!(counter.is_none()),
            }
            assert_eq!(state.len(), if names == Convention::Torch { 5 } else { 4 });
        }
    }
}

#[test]
fn batch_norm_without_affine_or_tracking_exports_only_what_it_has() {
    let ctx = ctx();
    let mut config = BatchNormConfig::torch_1d().affine(false);
    config.track_running_stats = false;
    let a = BatchNorm::new(ctx, 3, config.clone()).unwrap();
    let mut b = BatchNorm::new(ctx, 3, config).unwrap();
    for names in BOTH {
        assert!(round_trip("bare batch_norm", &a, &mut b, names).is_empty());
    }
}

#[test]
fn instance_norm_state_round_trips_bit_exactly_under_both_conventions() {
    let ctx = ctx();
    let config = InstanceNormConfig {
        affine: true,
        track_running_stats: true,
        ..InstanceNormConfig::torch()
    };
    for names in BOTH {
        let (w, b, m, v) = (
            odd_values(3, 5),
            odd_values(3, 6),
            odd_values(3, 7),
            odd_values(3, 8),
        );
        let mut a = InstanceNorm::new(ctx, 3, config.clone()).unwrap();
        a.set_affine(Affine {
            weight: Some(upload(&w)),
            bias: Some(upload(&b)),
        })
        .unwrap();
        a.set_running_stats(ctx, Some((upload(&m), upload(&v), Some(-3))))
            .unwrap();
        let mut fresh = InstanceNorm::new(ctx, 3, config.clone()).unwrap();
        let state = round_trip("instance_norm", &a, &mut fresh, names);
        let (wn, mn) = match names {
            Convention::Torch => ("weight", "running_mean"),
            Convention::Keras => ("gamma", "moving_mean"),
        };
        assert_bits(&state, wn, &w);
        assert_bits(&state, mn, &m);
        let expected_count = if names == Convention::Torch { -3 } else { 0 };
        assert_eq!(
            fresh.running_stats().unwrap().num_batches_tracked(ctx),
            Ok(Some(expected_count)),
            "Keras names carry no counter: it restarts at 0"
        );
    }
}

#[test]
fn group_norm_state_round_trips_bit_exactly_under_both_conventions() {
    let ctx = ctx();
    for (config, names) in [
        (GroupNormConfig::torch(), Convention::Torch),
        (GroupNormConfig::keras(), Convention::Keras),
        (GroupNormConfig::torch(), Convention::Keras),
    ] {
        let (w, b) = (odd_values(6, 9), odd_values(6, 10));
        let mut a = GroupNorm::new(ctx, 3, 6, config.clone()).unwrap();
        a.set_affine(Affine {
            weight: Some(upload(&w)),
            bias: Some(upload(&b)),
        })
        .unwrap();
        let mut fresh = GroupNorm::new(ctx, 3, 6, config).unwrap();
        let state = round_trip("group_norm", &a, &mut fresh, names);
        let (wn, bn) = match names {
            Convention::Torch => ("weight", "bias"),
            Convention::Keras => ("gamma", "beta"),
        };
        assert_bits(&state, wn, &w);
        assert_bits(&state, bn, &b);
        assert_eq!(state.len(), 2);
    }
}

#[test]
fn layer_norm_state_round_trips_bit_exactly_with_its_normalized_shape() {
    let ctx = ctx();
    for names in BOTH {
        let (w, b) = (odd_values(12, 11), odd_values(12, 12));
        let config = RowNormConfig::torch_layer_norm();
        let mut a = LayerNorm::new(ctx, &[3, 4], config.clone()).unwrap();
        a.set_weight(Some(upload(&w))).unwrap();
        a.set_bias(Some(upload(&b))).unwrap();
        let mut fresh = LayerNorm::new(ctx, &[3, 4], config).unwrap();
        let state = round_trip("layer_norm", &a, &mut fresh, names);
        let (wn, bn) = match names {
            Convention::Torch => ("weight", "bias"),
            Convention::Keras => ("gamma", "beta"),
        };
        assert_bits(&state, wn, &w);
        assert_bits(&state, bn, &b);
        assert_eq!(state.get(wn).unwrap().shape(), &[3, 4]);
    }
}

#[test]
fn rms_norm_state_round_trips_bit_exactly_and_keras_calls_it_scale() {
    let ctx = ctx();
    for names in BOTH {
        let w = odd_values(8, 13);
        let mut a = RmsNorm::new(ctx, &[8], RowNormConfig::torch_rms_norm()).unwrap();
        a.set_weight(Some(upload(&w))).unwrap();
        let mut fresh = RmsNorm::new(ctx, &[8], RowNormConfig::keras_rms_norm()).unwrap();
        let state = round_trip("rms_norm", &a, &mut fresh, names);
        let name = match names {
            Convention::Torch => "weight",
            Convention::Keras => "scale",
        };
        assert_bits(&state, name, &w);
        assert_eq!(state.len(), 1);
    }
}

#[test]
fn several_layers_share_one_file_under_prefixes() {
    let ctx = ctx();
    let mut bn1 = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    bn1.set_weight(Some(upload(&[2.0, 3.0]))).unwrap();
    let mut ln = LayerNorm::new(ctx, &[5], RowNormConfig::torch_layer_norm()).unwrap();
    ln.set_bias(Some(upload(&[1.0, 2.0, 3.0, 4.0, 5.0])))
        .unwrap();
    let mut dict = StateDict::new();
    bn1.save_state(ctx, &mut dict, "encoder.bn1", Convention::Torch)
        .unwrap();
    ln.save_state(ctx, &mut dict, "encoder.ln.", Convention::Torch)
        .unwrap();
    let keys: Vec<&str> = dict.keys().collect();
    assert_eq!(
        keys,
        [
            "encoder.bn1.bias",
            "encoder.bn1.num_batches_tracked",
            "encoder.bn1.running_mean",
            "encoder.bn1.running_var",
            "encoder.bn1.weight",
            "encoder.ln.bias",
            "encoder.ln.weight",
        ]
    );
    let mut bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    bn.load_state(ctx, &dict, "encoder.bn1", Convention::Torch)
        .unwrap();
    assert_eq!(
        ctx.download(bn.affine().weight.as_ref().unwrap()),
        Ok(vec![2.0, 3.0])
    );
    let mut keras = StateDict::new();
    bn1.save_state(ctx, &mut keras, "model/bn", Convention::Keras)
        .unwrap();
    assert!(keras.get("model/bn/moving_variance").is_some());
}

#[test]
fn half_precision_file_tensors_widen_to_f32_exactly() {
    let ctx = ctx();
    let values = [0.1f32, -2.5, 65504.0];
    for (dtype, bytes) in [
        (
            safetensors::Dtype::F16,
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        (
            safetensors::Dtype::BF16,
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    ] {
        let mut dict = StateDict::new();
        dict.insert("weight", HostTensor::new(dtype, &[3], bytes).unwrap());
        let mut ln = LayerNorm::new(
            ctx,
            &[3],
            RowNormConfig::torch_layer_norm().elementwise_affine(false),
        )
        .unwrap();
        ln.set_weight(Some(upload(&[1.0; 3]))).unwrap();
        ln.load_state(ctx, &dict, "", Convention::Torch).unwrap();
        let got = ctx.download(ln.affine().weight.as_ref().unwrap()).unwrap();
        let want: Vec<f32> = match dtype {
            safetensors::Dtype::F16 => values
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect(),
            _ => values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
        };
        assert_eq!(got, want, "{dtype:?}");
        // Export writes F32.
        let out = ln.state(ctx, Convention::Torch).unwrap();
        assert_eq!(out.get("weight").unwrap().dtype(), safetensors::Dtype::F32);
    }
}

/// Loads the torch checkpoint's `prefix` into `layer`, runs `x` in eval mode
/// and compares with torch's float64 output.
fn check_eval<L: Stateful>(
    layer: &mut L,
    prefix: &str,
    forward: impl Fn(&mut L, &gpunorm::GpuTensor) -> gpunorm::GpuTensor,
    model: &StateDict,
    io: &StateDict,
    convention: Convention,
) {
    let ctx = ctx();
    layer.load_state(ctx, model, prefix, convention).unwrap();
    let (x, shape) = floats(io, &format!("{prefix}.x"));
    let y = forward(layer, &ctx.upload(&x, &shape).unwrap());
    assert_close(
        &format!("{prefix} eval"),
        &ctx.download(&y).unwrap(),
        &wide(io, &format!("{prefix}.y")),
        1e-5,
        0.0,
    );
}

#[test]
fn a_torch_state_dict_reproduces_torch_eval_outputs() {
    let ctx = ctx();
    let model = fixture("torch_model.safetensors");
    let io = fixture("torch_io.safetensors");
    let t = Convention::Torch;
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_2d()).unwrap();
    check_eval(
        &mut bn,
        "bn",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        t,
    );
    assert_eq!(
        bn.running_stats().unwrap().num_batches_tracked(ctx),
        Ok(Some(4))
    );
    let mut cum_config = BatchNormConfig::torch_1d();
    cum_config.momentum = None;
    let mut bn_cum = BatchNorm::new(ctx, 4, cum_config).unwrap();
    check_eval(
        &mut bn_cum,
        "bn_cum",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        t,
    );
    let inorm_config = InstanceNormConfig {
        affine: true,
        track_running_stats: true,
        ..InstanceNormConfig::torch()
    };
    let mut inorm = InstanceNorm::new(ctx, 3, inorm_config).unwrap();
    check_eval(
        &mut inorm,
        "inorm",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        t,
    );
    let mut ln = LayerNorm::new(ctx, &[2, 5], RowNormConfig::torch_layer_norm()).unwrap();
    check_eval(
        &mut ln,
        "ln",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        t,
    );
    let rms_config = RowNormConfig {
        eps: 1e-6,
        ..RowNormConfig::torch_rms_norm()
    };
    let mut rms = RmsNorm::new(ctx, &[6], rms_config).unwrap();
    check_eval(
        &mut rms,
        "rms",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        t,
    );
    let mut gn = GroupNorm::new(ctx, 2, 4, GroupNormConfig::torch()).unwrap();
    check_eval(
        &mut gn,
        "gn",
        |l, x| l.forward(ctx, x).unwrap(),
        &model,
        &io,
        t,
    );

    // Saving every layer back under the same prefixes gives torch's file,
    // bit for bit (shapes, dtypes and the I64 scalar counter included).
    let mut back = StateDict::new();
    bn.save_state(ctx, &mut back, "bn", t).unwrap();
    bn_cum.save_state(ctx, &mut back, "bn_cum", t).unwrap();
    inorm.save_state(ctx, &mut back, "inorm", t).unwrap();
    ln.save_state(ctx, &mut back, "ln", t).unwrap();
    rms.save_state(ctx, &mut back, "rms", t).unwrap();
    gn.save_state(ctx, &mut back, "gn", t).unwrap();
    assert_eq!(back, model);
}

#[test]
fn a_loaded_num_batches_tracked_drives_the_cumulative_average() {
    // momentum=None: the next train forward weighs the batch by
    // 1 / (num_batches_tracked + 1) = 1/4, as torch did.
    let ctx = ctx();
    let model = fixture("torch_model.safetensors");
    let io = fixture("torch_io.safetensors");
    let mut config = BatchNormConfig::torch_1d();
    config.momentum = None;
    let mut bn = BatchNorm::new(ctx, 4, config).unwrap();
    bn.load_state(ctx, &model, "bn_cum", Convention::Torch)
        .unwrap();
    let (x, shape) = floats(&io, "bn_cum.x");
    let y = bn
        .forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
        .unwrap();
    assert_close(
        "train output",
        &ctx.download(&y).unwrap(),
        &wide(&io, "bn_cum.train_y"),
        1e-5,
        0.0,
    );
    let r = bn.running_stats().unwrap();
    assert_close(
        "running_mean after",
        &ctx.download(&r.mean).unwrap(),
        &wide(&io, "bn_cum.after.running_mean"),
        1e-6,
        1e-6,
    );
    assert_close(
        "running_var after",
        &ctx.download(&r.var).unwrap(),
        &wide(&io, "bn_cum.after.running_var"),
        1e-6,
        1e-6,
    );
    assert_eq!(r.num_batches_tracked(ctx), Ok(Some(4)));
}

#[test]
fn keras_weights_reproduce_keras_outputs() {
    let ctx = ctx();
    let model = fixture("keras_model.safetensors");
    let io = fixture("keras_io.safetensors");
    let k = Convention::Keras;
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::keras()).unwrap();
    check_eval(
        &mut bn,
        "batch_normalization",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        k,
    );
    let mut ln = LayerNorm::new(ctx, &[4], RowNormConfig::keras_layer_norm()).unwrap();
    check_eval(
        &mut ln,
        "layer_normalization",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        k,
    );
    let mut rms = RmsNorm::new(ctx, &[6], RowNormConfig::keras_rms_norm()).unwrap();
    check_eval(
        &mut rms,
        "rms_normalization",
        |l, x| l.forward(ctx, x, Mode::Eval).unwrap(),
        &model,
        &io,
        k,
    );
    let mut gn = GroupNorm::new(ctx, 2, 4, GroupNormConfig::keras()).unwrap();
    check_eval(
        &mut gn,
        "group_normalization",
        |l, x| l.forward(ctx, x).unwrap(),
        &model,
        &io,
        k,
    );

    // One train step after loading follows Keras's moving-average rule.
    let (x, shape) = floats(&io, "batch_normalization.x");
    let y = bn
        .forward(ctx, &ctx.upload(&x, &shape).unwrap(), Mode::Train)
        .unwrap();
    assert_close(
        "keras train output",
        &ctx.download(&y).unwrap(),
        &wide(&io, "batch_normalization.train_y"),
        1e-5,
        0.0,
    );
    let r = bn.running_stats().unwrap();
    assert_close(
        "moving_mean after",
        &ctx.download(&r.mean).unwrap(),
        &wide(&io, "batch_normalization.after.moving_mean"),
        1e-6,
        1e-6,
    );
    assert_close(
        "moving_variance after",
        &ctx.download(&r.var).unwrap(),
        &wide(&io, "batch_normalization.after.moving_variance"),
        1e-6,
        1e-6,
    );

    let mut back = StateDict::new();
    let mut reloaded = BatchNorm::new(ctx, 3, BatchNormConfig::keras()).unwrap();
    reloaded
        .load_state(ctx, &model, "batch_normalization", k)
        .unwrap();
    reloaded
        .save_state(ctx, &mut back, "batch_normalization", k)
        .unwrap();
    ln.save_state(ctx, &mut back, "layer_normalization", k)
        .unwrap();
    rms.save_state(ctx, &mut back, "rms_normalization", k)
        .unwrap();
    gn.save_state(ctx, &mut back, "group_normalization", k)
        .unwrap();
    assert_eq!(back, model, "Keras weights re-export bit for bit");
}

/// A torch-named BatchNorm1d(3) state with one tensor changed by `edit`.
fn edited(edit: impl FnOnce(&mut StateDict)) -> StateDict {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
    bn.set_weight(Some(upload(&[4.0, 5.0, 6.0]))).unwrap();
    let mut dict = bn.state(ctx, Convention::Torch).unwrap();
    edit(&mut dict);
    dict
}

/// Loads `dict` into a layer with non-default state and checks the error
/// kind and that the layer's whole state is unchanged.
fn load_fails(what: &str, dict: &StateDict) -> Error {
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
    bn.set_weight(Some(upload(&[7.0, 8.0, 9.0]))).unwrap();
    bn.set_running_stats(
        ctx,
        Some((
            upload(&[0.5, 0.25, 0.125]),
            upload(&[2.0, 3.0, 4.0]),
            Some(11),
        )),
    )
    .unwrap();
    let before = bn.state(ctx, Convention::Torch).unwrap();
    let err = bn
        .load_state(ctx, dict, "", Convention::Torch)
        .expect_err(what);
    assert_eq!(
        bn.state(ctx, Convention::Torch).unwrap(),
        before,
        "{what}: the layer changed after {err}"
    );
    err
}

#[test]
fn a_missing_tensor_is_a_state_error_and_changes_nothing() {
    for name in ["weight", "bias", "running_mean", "running_var"] {
        let dict = edited(|d| {
            d.remove(name);
        });
        assert!(matches!(load_fails(name, &dict), Error::State(_)), "{name}");
    }
}

#[test]
fn a_length_mismatch_is_a_shape_error_and_changes_nothing() {
    for name in ["weight", "bias", "running_mean", "running_var"] {
        let dict = edited(|d| {
            d.insert(name, HostTensor::from_f32(&[4], &[1.0; 4]).unwrap());
        });
        let err = load_fails(name, &dict);
        assert!(matches!(err, Error::Shape(_)), "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn running_mean_without_running_var_is_partial_state() {
    let dict = edited(|d| {
        d.remove("running_var");
        d.remove("num_batches_tracked");
    });
    let err = load_fails("mean without var", &dict);
    assert!(
        matches!(err, Error::State(_)) && err.to_string().contains("partial"),
        "{err}"
    );
}

#[test]
fn torch_names_without_num_batches_tracked_are_partial_state() {
    let dict = edited(|d| {
        d.remove("num_batches_tracked");
    });
    let err = load_fails("no counter", &dict);
    assert!(err.to_string().contains("num_batches_tracked"), "{err}");
}

#[test]
fn a_tensor_the_layer_lacks_is_an_unexpected_key() {
    let ctx = ctx();
    let dict = edited(|_| {});
    let mut bare = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d().affine(false)).unwrap();
    let err = bare
        .load_state(ctx, &dict, "", Convention::Torch)
        .unwrap_err();
    assert!(
        matches!(err, Error::State(_)) && err.to_string().contains("unexpected"),
        "{err}"
    );
    assert!(bare.affine().weight.is_none());
}

#[test]
fn a_tensor_no_layer_of_the_kind_has_is_an_unexpected_key_and_changes_nothing() {
    // torch's strict load_state_dict: "Unexpected key(s) in state_dict".
    let three = || HostTensor::from_f32(&[3], &[1.0; 3]).unwrap();
    for (name, tensor) in [
        ("weights", three()),
        ("running_variance", three()),
        (
            "num_batches_tracked_",
            HostTensor::from_i64(&[], &[1]).unwrap(),
        ),
    ] {
        let dict = edited(|d| {
            d.insert(name, tensor);
        });
        let err = load_fails(name, &dict);
        assert!(
            matches!(err, Error::State(_)) && err.to_string().contains(name),
            "{name}: {err}"
        );
    }
    let ctx = ctx();
    // A counter for a BatchNorm without running statistics.
    let untracked = BatchNormConfig {
        track_running_stats: false,
        ..BatchNormConfig::torch_1d()
    };
    let mut bn = BatchNorm::new(ctx, 3, untracked).unwrap();
    let dict = edited(|d| {
        d.remove("running_mean");
        d.remove("running_var");
    });
    let err = bn
        .load_state(ctx, &dict, "", Convention::Torch)
        .unwrap_err();
    assert!(err.to_string().contains("num_batches_tracked"), "{err}");
    // Running statistics for a LayerNorm, under a prefix; the keys of
    // other layers (another prefix, or none) are theirs.
    let mut ln = LayerNorm::new(ctx, &[3], RowNormConfig::torch_layer_norm()).unwrap();
    let mut dict = StateDict::new();
    for (name, tensor) in [
        ("ln.weight", three()),
        ("ln.bias", three()),
        ("ln2.weight", three()),
        ("weight", three()),
    ] {
        dict.insert(name, tensor);
    }
    ln.load_state(ctx, &dict, "ln", Convention::Torch).unwrap();
    dict.insert("ln.running_mean", three());
    let err = ln
        .load_state(ctx, &dict, "ln", Convention::Torch)
        .unwrap_err();
    assert!(err.to_string().contains("ln.running_mean"), "{err}");
}

#[test]
fn wrong_dtypes_are_dtype_errors_and_change_nothing() {
    let weight_as_ints = edited(|d| {
        d.insert("weight", HostTensor::from_i64(&[3], &[1, 2, 3]).unwrap());
    });
    assert!(matches!(
        load_fails("i64 weight", &weight_as_ints),
        Error::Dtype(_)
    ));
    let counter_as_float = edited(|d| {
        d.insert(
            "num_batches_tracked",
            HostTensor::from_f32(&[], &[3.0]).unwrap(),
        );
    });
    assert!(matches!(
        load_fails("f32 counter", &counter_as_float),
        Error::Dtype(_)
    ));
}

#[test]
fn a_prefix_that_matches_nothing_is_a_missing_tensor() {
    let dict = edited(|_| {});
    let ctx = ctx();
    let mut bn = BatchNorm::new(ctx, 3, BatchNormConfig::torch_1d()).unwrap();
    let err = bn
        .load_state(ctx, &dict, "bn1", Convention::Torch)
        .unwrap_err();
    assert!(err.to_string().contains("bn1.weight"), "{err}");
}

#[test]
fn malformed_files_are_file_errors() {
    let path = temp_path("garbage.safetensors");
    std::fs::write(&path, [0xffu8; 64]).unwrap();
    assert!(matches!(StateDict::load(&path), Err(Error::File(_))));
    // A header that declares more data than the file holds.
    let header = br#"{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#;
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend_from_slice(header);
    std::fs::write(&path, &lying).unwrap();
    assert!(matches!(StateDict::load(&path), Err(Error::File(_))));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        StateDict::load(temp_path("does-not-exist")),
        Err(Error::File(_))
    ));
}

#[test]
fn save_replaces_a_file_whole() {
    let ctx = ctx();
    let path = temp_path("replace.safetensors");
    let bn = BatchNorm::new(ctx, 2, BatchNormConfig::torch_1d()).unwrap();
    bn.state(ctx, Convention::Torch)
        .unwrap()
        .save(&path)
        .unwrap();
    let ln = LayerNorm::new(ctx, &[3], RowNormConfig::torch_layer_norm()).unwrap();
    let small = ln.state(ctx, Convention::Torch).unwrap();
    small.save(&path).unwrap();
    assert_eq!(StateDict::load(&path).unwrap(), small);
    std::fs::remove_file(&path).unwrap();
}
