// Backward row kernel on subgroups, for adapters with Features::SUBGROUP:
// one subgroup per contiguous group of the stats view (SA = 1, SB a
// multiple of four, BWD_VEC4), several groups per workgroup, sums with
// subgroupAdd and no workgroup barrier (the forward's rows_subgroup, same
// slot scheme). The subgroup size is read at run time (8 on lavapipe, 32
// on NVIDIA, 32 or 64 on AMD): nothing assumes one. Appended to the
// backward source only for this kernel, so adapters without subgroups
// never compile it.
//
// With BWD_ROWS_R = 4 a subgroup walks four groups at a time and loads each
// vector of γ once for the four (every group has the same parameters
// then); a last partial step repeats the last group, whose lanes rewrite
// the same values.
//
// With BWD_COLUMN_SUMS (four groups per step, LayerNorm and RMSNorm rows,
// one affine parameter per column) the second pass also sums dy and dy·x̂
// over the step's rows, column by column, and writes them as the step's
// partial (column_sums_slot). bwd_column_sums adds the steps up into dβ
// and dγ, so the gradients of γ and β cost half a scalar store per element
// here and half a load there, instead of a third read of x and dy (the
// column kernel). The row kernels take batch statistics only (eval-mode
// backwards go elsewhere), so grad_input is grad_from's.
//
// Half storage of groups of a multiple of 8 elements is bound as
// vec4<u32> (PAIRED_ACCESS, backward_io_half_pairs.wgsl) where channels
// are whole pairs too and a subgroup walks one group per step (src/
// backward.rs): lanes move pairs of vectors of x, grad_output and
// grad_input, one 16-byte access each.
const BWD_ROWS_R_MAX: u32 = 4u;

// grad_input of four elements of x and dy (γ w) of a group with statistics
// st and sums s.
fn row_grad(x: vec4<f32>, dy: vec4<f32>, st: vec4<f32>, s: vec4<f32>, w: vec4<f32>) -> vec4<f32> {
    let xhat = ((x - st.x) - st.y) * st.z;
    var g = dy;
    if (BWD_WEIGHT) {
        g = dy * w;
    }
    return grad_from(g, xhat, s, st);
}

// terms4 of the pair of vectors i8 (γ w0, w1), one access each for x and dy.
fn terms8(i8: u32, st: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>) -> vec4<f32> {
    let x = load_x8(i8);
    let d = load_dy8(i8);
    return terms_of(x[0], d[0], st, w0) + terms_of(x[1], d[1], st, w1);
}

@compute @workgroup_size(BWD_SG_WG)
fn bwd_rows_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, BWD_SG_WG, bwd_linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let width = steps.width;
    let n = bp.sb;
    let n4 = n / 4u;
    let groups = bp.sp * bp.sg;
    for (var first = steps.first * BWD_ROWS_R; first < groups; first += steps.stride * BWD_ROWS_R) {
        var base4: array<u32, BWD_ROWS_R_MAX>;
        var st: array<vec4<f32>, BWD_ROWS_R_MAX>;
        var s: array<vec4<f32>, BWD_ROWS_R_MAX>;
        for (var r = 0u; r < BWD_ROWS_R; r++) {
            let group = min(first + r, groups - 1u);
            base4[r] = group * n4;
            st[r] = stats[group];
        }
        // The affine layout of the first group is every group's.
        let base = first * n;
        let c0 = affine_index(base);
        // Channel by channel, as bwd_rows.
        let d4 = group_channel_len4(n4);
        let channels = n4 / d4;
        // Pairs: the host binds them only where channels (and so groups)
        // are whole pairs of vectors. A constant, so that a module holds
        // one of the two paths (both in one were twice the machine code).
        let d8 = d4 / 2u;
        for (var ch = 0u; ch < channels; ch++) {
            var acc: array<vec4<f32>, BWD_ROWS_R_MAX>;
            if (PAIRED_ACCESS) {
                for (var j8 = ch * d8 + lane; j8 < (ch + 1u) * d8; j8 += width) {
                    let w0 = group_weight4(base, c0, ch, 2u * j8);
                    let w1 = group_weight4(base, c0, ch, 2u * j8 + 1u);
                    for (var r = 0u; r < BWD_ROWS_R; r++) {
                        acc[r] += terms8(base4[r] / 2u + j8, st[r], w0, w1);
                    }
                }
            } else {
                for (var j4 = ch * d4 + lane; j4 < (ch + 1u) * d4; j4 += width) {
                    let w = group_weight4(base, c0, ch, j4);
                    for (var r = 0u; r < BWD_ROWS_R; r++) {
                        acc[r] += terms4(base4[r] + j4, st[r], w);
                    }
                }
            }
            for (var r = 0u; r < BWD_ROWS_R; r++) {
                let sc = subgroupAdd(acc[r]);
                // Only with one group per step (the host checks).
                if (lane == 0u && bwd_flag(BF_WRITE_PARTIALS)) {
                    work[bp.partials_offset + first * channels + ch] = sc;
                }
                s[r] += sc;
            }
        }
        // Rows past the end repeat the last one: left out of column sums.
        var live: array<bool, BWD_ROWS_R_MAX>;
        for (var r = 0u; r < BWD_ROWS_R; r++) {
            live[r] = first + r < groups;
        }
        let step = first / BWD_ROWS_R;
        for (var ch = 0u; ch < channels; ch++) {
            if (PAIRED_ACCESS) {
                // One group per step, no column sums (the host's rule).
                for (var j8 = ch * d8 + lane; j8 < (ch + 1u) * d8; j8 += width) {
                    let w0 = group_weight4(base, c0, ch, 2u * j8);
                    let w1 = group_weight4(base, c0, ch, 2u * j8 + 1u);
                    for (var r = 0u; r < BWD_ROWS_R; r++) {
                        let i8 = base4[r] / 2u + j8;
                        let x = load_x8(i8);
                        let dy = load_dy8(i8);
                        store_dx8(i8, row_grad(x[0], dy[0], st[r], s[r], w0), row_grad(x[1], dy[1], st[r], s[r], w1));
                    }
                }
            } else {
                for (var j4 = ch * d4 + lane; j4 < (ch + 1u) * d4; j4 += width) {
                    let w = group_weight4(base, c0, ch, j4);
                    var col_dy = vec4<f32>(0.0);
                    var col_dy_xhat = vec4<f32>(0.0);
                    for (var r = 0u; r < BWD_ROWS_R; r++) {
                        let i4 = base4[r] + j4;
                        let dy = load_dy4(i4);
                        let xhat = ((load_x4(i4) - st[r].x) - st[r].y) * st[r].z;
                        var g = dy;
                        if (BWD_WEIGHT) {
                            g = dy * w;
                        }
                        store_dx4(i4, grad_from(g, xhat, s[r], st[r]));
                        if (BWD_COLUMN_SUMS) {
                            col_dy += select(vec4<f32>(0.0), dy, live[r]);
                            col_dy_xhat += select(vec4<f32>(0.0), dy * xhat, live[r]);
                        }
                    }
                    if (BWD_COLUMN_SUMS) {
                        let at = column_sums_slot(step, j4);
                        work[at] = col_dy;
                        work[at + 8u] = col_dy_xhat;
                    }
                }
            }
        }
    }
}
