// Single-dispatch kernel for groups that are contiguous rows (A = 1): most
// LayerNorm/RMSNorm rows, GroupNorm and InstanceNorm without running stats.
//
// One workgroup owns one row of B elements at x[row·B ..]. Invocation `lid`
// owns the element pairs (j, j + 1) with j = 2·(lid + k·ROWS_WG); the first
// ROWS_CACHE pairs are held in registers, so rows up to
// 2·ROWS_CACHE·ROWS_WG elements are read from memory once; longer rows
// re-read the rest. The workgroup sums (x - shift) with shift = the median
// of the row's first, middle and last elements (zero for RMS), then the squared deviations about that mean
// (an exact two-pass variance, robust to any offset), writes the statistics
// to scratch[row] for the backward pass, and normalizes the row. Reductions
// go through workgroup memory. Pairs keep packed f16/bf16 words whole (the
// host sends rows of odd length here only for f32 storage).

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

// Elements j and j + 1 of the row (the second is 0 past the row's end),
// shifted.
fn load_pair(base: u32, j: u32, n: u32, shift: f32) -> vec2<f32> {
    var v = vec2<f32>(load_x(base + j) - shift, 0.0);
    if (j + 1u < n) {
        v.y = load_x(base + j + 1u) - shift;
    }
    return v;
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
    let rms = IS_RMS;
    var shift = 0.0;
    if (!rms) {
        shift = median3(load_x(base), load_x(base + n / 2u), load_x(base + n - 1u));
    }
    let step = 2u * ROWS_WG;
    let cached_end = min(n, step * ROWS_CACHE);

    var cache: array<vec2<f32>, ROWS_CACHE>;
    var s = 0.0;
    for (var k = 0u; k < ROWS_CACHE; k++) {
        let j = 2u * lid + k * step;
        if (j < n) {
            let v = load_pair(base, j, n, shift);
            cache[k] = v;
            s += v.x + v.y;
        }
    }
    for (var j = cached_end + 2u * lid; j < n; j += step) {
        let v = load_pair(base, j, n, shift);
        s += v.x + v.y;
    }
    var dmean = 0.0;
    if (!rms) {
        dmean = workgroup_sum(lid, s) / f32(n);
    }

    var s2 = 0.0;
    for (var k = 0u; k < ROWS_CACHE; k++) {
        let j = 2u * lid + k * step;
        if (j < n) {
            var d = cache[k] - dmean;
            if (j + 1u >= n) {
                d.y = 0.0;
            }
            s2 += dot(d, d);
        }
    }
    for (var j = cached_end + 2u * lid; j < n; j += step) {
        var d = load_pair(base, j, n, shift) - dmean;
        if (j + 1u >= n) {
            d.y = 0.0;
        }
        s2 += dot(d, d);
    }
    let variance = workgroup_sum(lid, s2) / f32(n);
    let rstd = batch_rstd(variance);
    if (lid == 0u) {
        scratch[row] = vec4<f32>(shift, dmean, rstd, variance);
    }

    for (var k = 0u; k < ROWS_CACHE; k++) {
        let j = 2u * lid + k * step;
        if (j < n) {
            let y = (cache[k] - dmean) * rstd;
            store_y2(base + j, affine(y.x, g, j), affine(y.y, g, j + 1u), j + 1u < n);
        }
    }
    for (var j = cached_end + 2u * lid; j < n; j += step) {
        let y = (load_pair(base, j, n, shift) - dmean) * rstd;
        store_y2(base + j, affine(y.x, g, j), affine(y.y, g, j + 1u), j + 1u < n);
    }
}
