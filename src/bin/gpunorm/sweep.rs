//! `gpunorm bench --sweep`: GB/s against the row (or spatial) length at a
//! fixed total size, for one op or every op, with a progress bar, an SVG
//! plot and a CSV (CLI.md).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use gpunorm::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;

use crate::apply::{check_flags, ConventionArg, Op};
use crate::bench::{op_name, Bench, BenchArgs, Measurement, Settings};

/// Elements of every tensor of the sweep: 16 MiB of f32, large enough to
/// leave every cache on a real GPU, small enough that the default sweep of
/// every op runs in well under a minute on lavapipe.
pub const TOTAL: usize = 1 << 22;
/// Shortest and longest row (or spatial) length, doubling in between.
pub const LENGTHS: [usize; 9] = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];
/// Channels of the batch-, instance- and group-norm tensors: a layer of a
/// small CNN, and 64 · 65536 = TOTAL, so the longest length is one sample.
pub const CHANNELS: usize = 64;
/// Groups of group-norm when `--groups` is not given (torch's usual 32).
pub const GROUPS: usize = 32;
/// Timed iterations per point when `--iters` is not given.
pub const SWEEP_ITERS: usize = 5;
/// Untimed runs per point.
pub const SWEEP_WARMUP: usize = 1;

const ALL_OPS: [Op; 5] = [
    Op::LayerNorm,
    Op::RmsNorm,
    Op::BatchNorm,
    Op::GroupNorm,
    Op::InstanceNorm,
];

/// The input of `op` whose rows (layer-norm, rms-norm) or spatial extent
/// (batch-, group-, instance-norm) have `len` elements, TOTAL in all.
pub fn shape(op: Op, keras: bool, len: usize) -> Vec<usize> {
    match op {
        Op::LayerNorm | Op::RmsNorm => vec![TOTAL / len, len],
        _ => {
            let n = (TOTAL / (CHANNELS * len)).max(1);
            if keras && op != Op::InstanceNorm {
                vec![n, len, CHANNELS]
            } else {
                vec![n, CHANNELS, len]
            }
        }
    }
}

/// The ops the sweep runs, after checking that the flags fit them.
fn ops(args: &BenchArgs) -> Result<Vec<Op>> {
    let keras = args.flags.convention == ConventionArg::Keras;
    let refuse = |flag: &str, why: &str| -> Result<Vec<Op>> {
        Err(Error::InvalidArgument(format!(
            "{flag} does not apply to --sweep {why}"
        )))
    };
    if args.flags.normalized_shape.is_some() {
        return refuse("--normalized-shape", "(the sweep chooses the shapes)");
    }
    if args.flags.axis.is_some() {
        return refuse("--axis", "(the sweep chooses the shapes)");
    }
    match args.op {
        Some(op) => Ok(vec![op]),
        None => {
            if args.flags.groups.is_some() {
                return refuse("--groups", "without --op group-norm");
            }
            if args.flags.momentum.is_some() {
                return refuse(
                    "--momentum",
                    "without --op batch-norm or --op instance-norm",
                );
            }
            // Keras has no instance-norm (apply refuses it too).
            Ok(ALL_OPS
                .into_iter()
                .filter(|&op| !(keras && op == Op::InstanceNorm))
                .collect())
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let ops = ops(args)?;
    let keras = args.flags.convention == ConventionArg::Keras;
    let mut flags = Vec::new();
    for &op in &ops {
        let mut f = args.op_flags(op);
        if op == Op::GroupNorm && f.flags.groups.is_none() {
            f.flags.groups = Some(GROUPS.to_string());
        }
        check_flags(&f)?;
        flags.push(f);
    }
    let bench = Bench::new(args.flags.adapter.clone())?;
    let settings = Settings {
        dtype: args.dtype.dtype(),
        mode: args.mode(),
        backward: args.backward,
        iters: args.iters.unwrap_or(SWEEP_ITERS),
        warmup: SWEEP_WARMUP,
    };
    let bar = ProgressBar::new((ops.len() * LENGTHS.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results: Vec<(usize, Measurement)> = Vec::new();
    for f in &flags {
        for &len in &LENGTHS {
            bar.set_message(format!("{} length {len}", op_name(f.op)));
            let shape = shape(f.op, keras, len);
            let m = bench.measure(f, &shape, &settings);
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    bar.abandon();
                    return Err(e);
                }
            };
            bar.suspend(|| m.print(args.json))?;
            results.push((len, m));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &args.csv {
        write_csv(path, &results)?;
    }
    if let Some(path) = &args.plot {
        plot(path, &results)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One row per measurement: GB/s against length, with what it came from.
fn write_csv(path: &Path, results: &[(usize, Measurement)]) -> Result<()> {
    let mut text = String::from(
        "op,length,shape,dtype,mode,backward,timing,iters,median_ms,min_ms,bytes,gbps,copy_gbps,transfer_gbps,fraction_of_copy,dispatches\n",
    );
    for (len, m) in results {
        let shape: Vec<String> = m.shape.iter().map(|d| d.to_string()).collect();
        let _ = writeln!(
            text,
            "{},{len},{},{},{},{},{},{},{:.6},{:.6},{},{:.6},{:.6},{:.6},{:.6},{}",
            m.op,
            shape.join("x"),
            m.dtype,
            m.mode,
            m.backward,
            m.timing,
            m.iters,
            m.median_ms,
            m.min_ms,
            m.bytes,
            m.gbps,
            m.copy_gbps,
            m.transfer_gbps,
            m.fraction_of_copy,
            m.dispatches
        );
    }
    std::fs::write(path, text)
        .map_err(|e| Error::File(format!("cannot write {}: {e}", path.display())))
}

fn plot_error<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::File(format!("cannot draw {}: {e}", path.display()))
}

/// GB/s against length (log₂ axis, labelled in elements), one line per op, and the copy kernel's
/// GB/s (averaged over the ops at each length) as the dashed ceiling.
fn plot(path: &Path, results: &[(usize, Measurement)]) -> Result<()> {
    let err = plot_error(path);
    let Some((_, first)) = results.first() else {
        return Ok(());
    };
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (len, m) in results {
        let point = ((*len as f64).log2(), m.gbps);
        match series.iter_mut().find(|(op, _)| *op == m.op) {
            Some((_, points)) => points.push(point),
            None => series.push((m.op.clone(), vec![point])),
        }
    }
    let copy: Vec<(f64, f64)> = LENGTHS
        .iter()
        .filter_map(|&len| {
            let at: Vec<f64> = results
                .iter()
                .filter(|(l, _)| *l == len)
                .map(|(_, m)| m.copy_gbps)
                .collect();
            (!at.is_empty()).then(|| {
                (
                    (len as f64).log2(),
                    at.iter().sum::<f64>() / at.len() as f64,
                )
            })
        })
        .collect();
    let y_max = results
        .iter()
        .flat_map(|(_, m)| [m.gbps, m.copy_gbps])
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let title = format!(
        "gpunorm {} {}{} on {} ({} clock, {} elements)",
        first.dtype,
        first.mode,
        if first.backward {
            " backward"
        } else {
            " forward"
        },
        first.adapter,
        first.timing,
        TOTAL
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (LENGTHS[0] as f64).log2() - 0.25..(LENGTHS[LENGTHS.len() - 1] as f64).log2() + 0.25,
            0.0..y_max,
        )
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("row / spatial length (elements, log scale)")
        .y_desc("GB/s (bytes of the byte model / median time)")
        .x_labels(LENGTHS.len())
        .x_label_formatter(&|v| format!("{}", 2f64.powf(v.round())))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()
        .map_err(&err)?;
    for (i, (op, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(&err)?
            .label(op.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(&err)?;
    }
    chart
        .draw_series(DashedLineSeries::new(copy, 6, 4, BLACK.stroke_width(1)))
        .map_err(&err)?
        .label("vec4 copy kernel (same bytes)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sweep_shape_holds_the_total_with_the_length_as_rows_or_space() {
        for op in ALL_OPS {
            for keras in [false, true] {
                for len in LENGTHS {
                    let s = shape(op, keras, len);
                    assert_eq!(s.iter().product::<usize>(), TOTAL, "{op:?} {len}");
                    let spatial = match (op, keras) {
                        (Op::LayerNorm | Op::RmsNorm, _) => s[1],
                        (Op::InstanceNorm, _) | (_, false) => s[2],
                        (_, true) => s[1],
                    };
                    assert_eq!(spatial, len);
                }
            }
        }
    }
}
