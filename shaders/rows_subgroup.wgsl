// Row kernel on subgroups, for adapters with Features::SUBGROUP: one
// subgroup per contiguous row (A = 1, B a multiple of 4), several rows per
// workgroup, reductions with subgroupAdd and no workgroup barrier. The
// subgroup size is read at run time (8 on lavapipe, 32 on NVIDIA, 32 or 64
// on AMD): nothing assumes one.
//
// Rows are spread over subgroups by subgroup_rows (subgroup_rows.wgsl).
// Lane `lane` owns the vec4 groups lane, lane + width, ... of its row. The statistics are shifted sums, Σ(x − shift) and Σ(x − shift)²
// with shift = the median of the row's first, middle and last elements (a
// large common offset cancels exactly, SPEC §6, and one outlier cannot pull
// the shift away from the data), in one read of x; the normalize is a second read.
// Holding short rows in registers for an exact two-pass variance was tried:
// lavapipe then kept the array in memory and ran 1.7x slower than two reads.

@compute @workgroup_size(ROWS_SG_WG)
fn rows_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let rows = subgroup_rows(lane, sg, ROWS_SG_WG, linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let width = rows.width;
    let n4 = params.b / 4u;
    let n = f32(params.b);
    let rms = IS_RMS;
    for (var row = rows.first; row < params.n_groups; row += rows.stride) {
        let base4 = row * n4;
        let g = row - fast_div(row, params.div_g) * params.g;
        var shift = 0.0;
        if (!rms) {
            let base = base4 * 4u;
            shift = median3(load_x(base), load_x(base + params.b / 2u), load_x(base + params.b - 1u));
        }
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        for (var j4 = lane; j4 < n4; j4 += width) {
            let v = load_x4(base4 + j4) - shift;
            s1 += v;
            s2 += v * v;
        }
        let t1 = subgroupAdd(hsum(s1));
        let t2 = subgroupAdd(hsum(s2));
        var dmean = 0.0;
        if (!rms) {
            dmean = t1 / n;
        }
        // Rounding can leave a tiny negative; a NaN (inf or NaN in the row)
        // must stay NaN, as in torch, so no max() here.
        var variance = (t2 - t1 * dmean) / n;
        if (variance < 0.0) {
            variance = 0.0;
        }
        let rstd = 1.0 / sqrt(variance + params.eps);
        if (lane == 0u) {
            scratch[row] = vec4<f32>(shift, dmean, rstd, variance);
        }
        for (var j4 = lane; j4 < n4; j4 += width) {
            let y = ((load_x4(base4 + j4) - shift) - dmean) * rstd;
            store_y4(base4 + j4, affine4(y, g, g * n4 + j4));
        }
    }
}
