//! Golden cases from real PyTorch and Keras (tests/fixtures/generate.py),
//! run through `gpunorm apply` exactly as a user would.
//!
//! Each case of tests/fixtures/cases/manifest.json names the CLI flags, an
//! input file and (unless it is an error case) the expected outputs computed
//! by the framework in float64.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cases")
}

fn read_tensors(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let d = view.data();
            let values: Vec<f64> = match view.dtype() {
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F16 => d
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                Dtype::BF16 => d
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, (view.dtype(), view.shape().to_vec(), values))
        })
        .collect()
}

/// ulp of |v| in a storage dtype with `mantissa` explicit bits.
fn ulp(v: f64, mantissa: i32) -> f64 {
    let v = v.abs().max(2f64.powi(-14));
    2f64.powi(v.log2().floor() as i32 - mantissa)
}

fn compare(
    case: &str,
    tol: &Value,
    got_dtype: Dtype,
    got: &[f64],
    want: &[f64],
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{case}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() && w.is_nan() || g == w {
            continue;
        }
        let limit = if let Some(ulps) = tol.get("ulps").and_then(Value::as_f64) {
            let mantissa = if got_dtype == Dtype::BF16 { 7 } else { 10 };
            ulps * ulp(w, mantissa)
        } else {
            tol["atol"].as_f64().unwrap() + tol["rtol"].as_f64().unwrap() * w.abs()
        };
        let within = (g - w).abs() <= limit;
        if !within {
            return Err(format!(
                "{case}: element {i} is {g}, expected {w} (limit {limit:e})"
            ));
        }
    }
    Ok(())
}

fn run_case(case: &Value, out_dir: &Path) -> Result<(), String> {
    let name = case["name"].as_str().unwrap();
    let input = cases_dir().join(format!("{name}.in.safetensors"));
    let output = out_dir.join(format!("{name}.out.safetensors"));
    let args: Vec<&str> = case["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let result = Command::new(env!("CARGO_BIN_EXE_gpunorm"))
        .arg("apply")
        .args(&args)
        .arg("--in")
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .output()
        .map_err(|e| format!("{name}: cannot run gpunorm: {e}"))?;
    let stderr = String::from_utf8_lossy(&result.stderr);
    if case["expect_error"].as_bool() == Some(true) {
        if result.status.success() {
            return Err(format!("{name}: expected an error, but apply succeeded"));
        }
        let first = stderr.lines().next().unwrap_or("");
        if !first.starts_with("error:") {
            return Err(format!(
                "{name}: stderr should begin with 'error:', got {stderr:?}"
            ));
        }
        if stderr.contains("panicked") {
            return Err(format!("{name}: panicked: {stderr}"));
        }
        if let Some(word) = case["error_mentions"].as_str() {
            if !first.contains(word) {
                return Err(format!("{name}: the error should name {word:?}: {first:?}"));
            }
        }
        if output.exists() {
            return Err(format!(
                "{name}: an output file was written despite the error"
            ));
        }
        return Ok(());
    }
    if !result.status.success() {
        return Err(format!("{name}: apply failed: {stderr}"));
    }
    let got = read_tensors(&output);
    let want = read_tensors(&cases_dir().join(format!("{name}.out.safetensors")));
    let got_names: Vec<_> = got.keys().collect();
    let want_names: Vec<_> = want.keys().collect();
    if got_names != want_names {
        return Err(format!(
            "{name}: wrote tensors {got_names:?}, expected {want_names:?}"
        ));
    }
    // The output and grad_input are stored in the input's dtype (the
    // expected values are F64, so their dtype says nothing of it).
    let input_dtype = match case["dtype"].as_str() {
        Some("f16") => Dtype::F16,
        Some("bf16") => Dtype::BF16,
        _ => Dtype::F32,
    };
    for tensor in ["output", "grad_input"] {
        if let Some((got_dtype, _, _)) = got.get(tensor) {
            if *got_dtype != input_dtype {
                return Err(format!(
                    "{name}/{tensor}: written as {got_dtype:?}, expected the input's {input_dtype:?}"
                ));
            }
        }
    }
    // Running statistics come back in the dtype they came in, and
    // `grad_<name>` in its parameter's (CLI.md).
    let given = read_tensors(&cases_dir().join(format!("{name}.in.safetensors")));
    for (tensor, (got_dtype, _, _)) in &got {
        let source = tensor.strip_prefix("grad_").unwrap_or(tensor);
        if source == "input" {
            continue; // grad_input: the input's dtype, checked above
        }
        if let Some((in_dtype, _, _)) = given.get(source) {
            if got_dtype != in_dtype {
                return Err(format!(
                    "{name}/{tensor}: written as {got_dtype:?}, expected {source}'s {in_dtype:?}"
                ));
            }
        }
    }
    for (tensor, (want_dtype, want_shape, want_values)) in &want {
        let (got_dtype, got_shape, got_values) = &got[tensor];
        if got_shape != want_shape {
            return Err(format!(
                "{name}/{tensor}: shape {got_shape:?}, expected {want_shape:?}"
            ));
        }
        if *want_dtype == Dtype::I64 {
            if got_dtype != want_dtype || got_values != want_values {
                return Err(format!("{name}/{tensor}: {got_values:?} ({got_dtype:?}), expected {want_values:?} (I64)"));
            }
            continue;
        }
        compare(
            &format!("{name}/{tensor}"),
            &case["tolerance"],
            *got_dtype,
            got_values,
            want_values,
        )?;
    }
    Ok(())
}

#[test]
fn every_golden_case_from_torch_and_keras_passes_through_the_cli() {
    let manifest: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(cases_dir().join("manifest.json")).unwrap())
            .unwrap();
    let out_dir = std::env::temp_dir().join(format!("gpunorm-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut failures = Vec::new();
    let mut passed = 0;
    for case in &manifest {
        match run_case(case, &out_dir) {
            Ok(()) => passed += 1,
            Err(e) => failures.push(e),
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    eprintln!("{passed} golden cases passed");
    assert!(
        failures.is_empty(),
        "{} golden case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(passed > 50, "too few golden cases ran");
}
