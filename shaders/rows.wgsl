// Single-dispatch kernel for groups that are contiguous rows (A = 1): most
// LayerNorm/RMSNorm rows, GroupNorm and InstanceNorm without running stats.
//
// One workgroup owns one row of B elements at x[row·B ..]: it sums
// (x - shift) with shift = the row's first element (zero for RMS), then the
// squared deviations about that mean (an exact two-pass variance, robust to
// any offset), writes the statistics to scratch[row] for the backward pass,
// and normalizes the row. Reductions go through workgroup memory.

var<workgroup> wg_acc: array<f32, ROWS_WG>;

fn workgroup_sum(lid: u32, v: f32) -> f32 {
    wg_acc[lid] = v;
    workgroupBarrier();
    for (var stride = ROWS_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            wg_acc[lid] += wg_acc[lid + stride];
        }
        workgroupBarrier();
    }
    let total = wg_acc[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(ROWS_WG)
fn rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = linear_workgroup(wid, nwg);
    if (row >= params.n_groups) {
        return;
    }
    let n = params.b;
    let base = row * n;
    let g = row % params.g;
    let rms = has_flag(FLAG_RMS);
    var shift = 0.0;
    if (!rms) {
        shift = load_x(base);
    }
    var dmean = 0.0;
    if (!rms) {
        var s = 0.0;
        for (var j = lid; j < n; j += ROWS_WG) {
            s += load_x(base + j) - shift;
        }
        dmean = workgroup_sum(lid, s) / f32(n);
    }
    var s2 = 0.0;
    for (var j = lid; j < n; j += ROWS_WG) {
        let d = (load_x(base + j) - shift) - dmean;
        s2 += d * d;
    }
    let variance = workgroup_sum(lid, s2) / f32(n);
    let rstd = 1.0 / sqrt(variance + params.eps);
    let st = vec4<f32>(shift, dmean, rstd, variance);
    if (lid == 0u) {
        scratch[row] = st;
    }
    for (var j = lid; j < n; j += ROWS_WG) {
        store_y(base + j, normalize_value(load_x(base + j), st, g, j));
    }
}
