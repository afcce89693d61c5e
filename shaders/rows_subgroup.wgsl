// Row kernel on subgroups, for adapters with Features::SUBGROUP: one
// subgroup per ROWS_SG_R contiguous rows at a time (A = 1, B a multiple of
// 4), several subgroups per workgroup, reductions with subgroupAdd and no
// workgroup barrier. The subgroup size is read at run time (8 on lavapipe,
// 32 on NVIDIA, 32 or 64 on AMD): nothing assumes one.
//
// Row steps are spread over subgroups by subgroup_rows (subgroup_rows.wgsl).
// Lane `lane` owns the vec4 groups lane, lane + width, ... of each row.
// The statistics are shifted sums, Σ(x − shift) and Σ(x − shift)², with
// shift = a median of the row's first, middle and last vectors (row_shift:
// a large common offset cancels exactly, SPEC §6, and one outlier cannot
// pull the shift away from the data), in one read of x; the normalize is a second
// read. Holding short rows in registers for an exact two-pass variance was
// tried: lavapipe then kept the array in memory and ran 1.7x slower than
// two reads. Half storage of rows of a multiple of 8 elements is bound as
// vec4<u32> (PAIRED_ACCESS): lanes then own pairs of vectors, moved by one
// 16-byte access each way, half the accesses of one vector at a time.

// Rows a subgroup walks together (ROWS_SG_R, common.wgsl): 1, or 4 when
// all rows share their affine parameters (G = 1: LayerNorm and RMSNorm;
// the host checks). Four rows at a time load each vector of γ and β once
// for the four, and keep four independent loads in flight. lavapipe makes
// every storage access one scalar access per lane, so its time follows
// their count: LayerNorm went from five accesses per element (x twice, γ,
// β, y) to three and a half (4096x1024: 7.4 to 6.3 ms). Eight rows at a
// time were no faster than four.
const ROWS_SG_R_MAX: u32 = 4u;

// y of vector i4 of a row with statistics (shift, dmean, rstd) and the
// vector's parameters a.
fn normalized_row4(i4: u32, shift: f32, dmean: f32, rstd: f32, a: Affine4) -> vec4<f32> {
    return apply_affine4(((load_x4(i4) - shift) - dmean) * rstd, a);
}

// (Σv, Σv²) per component for v = x − shift of unit u of x: the pair of
// vectors u where PAIRED_ACCESS (shifted_pair_terms), else the vector u.
fn shifted_unit_terms(u: u32, shift: f32) -> mat2x4<f32> {
    if (PAIRED_ACCESS) {
        return shifted_pair_terms(u, shift);
    }
    let v = load_x4(u) - shift;
    return mat2x4<f32>(v, v * v);
}

// Stores y of the pair of vectors i8 (elements 8·i8 .. 8·i8 + 7) of a row,
// one access each way (PAIRED_ACCESS).
fn normalize_row_pair(i8: u32, shift: f32, dmean: f32, rstd: f32, a0: Affine4, a1: Affine4) {
    let x = load_x8(i8);
    store_y8(i8, apply_affine4(((x[0] - shift) - dmean) * rstd, a0), apply_affine4(((x[1] - shift) - dmean) * rstd, a1));
}

// The shift of a row of n4 vectors from base4: the median of three of its
// values, the lower middle ones (lower_median4) of its first, middle and
// last vectors. One outlier, or one vector of them, cannot move it far (as
// with group_shift's median of three elements), and it lies about a third
// of σ from the mean rather than two thirds. The shifted sum of squares is
// (1 + d²/σ²) times M2 for a shift d from the mean, so the roundings of
// the lanes' and the subgroup's sums cost M2 that much more: LayerNorm
// rows of 16384 had rstd up to 11 roundings off with the median of three
// elements, about 3 with this, at the cost of two more loads per row.
// (Compensated lane sums took it to 2, for 6 to 9% more of lavapipe's
// time.)
//
// The median is then rounded to a coarse grid (coarse_shift), so that the
// shift has no low bits the data lacks.
fn row_shift(base4: u32, n4: u32) -> f32 {
    let a = lower_median4(load_x4(base4));
    let b = lower_median4(load_x4(base4 + n4 / 2u));
    let c = lower_median4(load_x4(base4 + n4 - 1u));
    return coarse_shift(median3(a, b, c), max(max(a, b), c) - min(min(a, b), c));
}

// `shift` rounded to a multiple of 2^-7 of `spread`'s binade (spread in
// [2^(e−1), 2^e): a multiple of 2^(e−8)), exactly, by powers of two, where
// spread is that of the values the shift was drawn from, a stand-in for σ.
// Why: a value of the data that is small next to the row's spread (0.003
// in a row of N(0.7, 1)) has low bits that the row's other values lack. On
// data of the f16 or bf16 grid, every x − shift then carries the same low
// bits, every step of a lane's sum rounds them the same way, and the
// errors add up instead of cancelling: f32 InstanceNorm [4, 64, 64, 64] of
// f16 values had means 20 roundings of σ off. On a grid of 2^-7 of the
// spread (bf16 keeps 8 bits), x − shift stays on the data's grid and
// Σ(x − shift) is exact until it outgrows f32's 24 bits (means within 2
// roundings of σ). A shift that is already a multiple stays as it is (a
// value of a row far from zero, whose grid is coarser); it moves by at
// most 2^-8 of the spread, so x − shift grows by no more than that: a
// constant row (spread 0) keeps its own value, x − shift = 0 and y = β
// exactly. Left alone where the grid would be subnormal, and for an
// infinite or NaN shift or spread.
fn coarse_shift(shift: f32, spread: f32) -> f32 {
    let grid_exp = frexp(spread).exp - 8;
    if (spread == 0.0 || !is_finite(spread) || !is_finite(shift) || grid_exp < -126) {
        return shift;
    }
    // Past 2^23 units the shift is a multiple already (and this keeps an
    // overflow to inf out of round()).
    let units = ldexp(shift, -grid_exp);
    if (abs(units) >= 8388608.0) {
        return shift;
    }
    return ldexp(round(units), grid_exp);
}

@compute @workgroup_size(ROWS_SG_WG)
fn rows_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, ROWS_SG_WG, linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let width = steps.width;
    let n4 = params.b / 4u;
    let n = f32(params.b);
    let last = params.n_groups - 1u;
    for (var first = steps.first * ROWS_SG_R; first < params.n_groups; first += steps.stride * ROWS_SG_R) {
        // Rows past the end repeat the last row: the same lanes write the
        // same values again, so no store needs a branch.
        var base4: array<u32, ROWS_SG_R_MAX>;
        var shift: array<f32, ROWS_SG_R_MAX>;
        var s1: array<vec4<f32>, ROWS_SG_R_MAX>;
        var s2: array<vec4<f32>, ROWS_SG_R_MAX>;
        for (var r = 0u; r < ROWS_SG_R; r++) {
            base4[r] = min(first + r, last) * n4;
            shift[r] = 0.0;
            if (!IS_RMS) {
                shift[r] = row_shift(base4[r], n4);
            }
        }
        // The sums' carries (compensated.wgsl), for half-precision storage
        // only: each lane adds COMPENSATED_BLOCK steps at a time into plain
        // block sums folded into compensated ones, so its hundreds of terms
        // cost its sums about a rounding rather than sqrt(n/3) of them
        // (f16 LayerNorm rows of 16384: outputs near zero 8 ulps off, 4
        // with them). f32 storage takes four vectors a step instead (below):
        // the blocks cost lavapipe 6 to 9% on f16 rows and 18% on f32
        // InstanceNorm, four vectors a step nothing measurable.
        var c1: array<vec4<f32>, ROWS_SG_R_MAX>;
        var c2: array<vec4<f32>, ROWS_SG_R_MAX>;
        if (HALF_STORAGE) {
            // Lane `lane` owns units lane, lane + width, ... of its rows: a
            // unit is a pair of vectors where PAIRED_ACCESS (rows of whole
            // pairs, one access each), else a vector.
            let per_unit = select(1u, 2u, PAIRED_ACCESS);
            let units = n4 / per_unit;
            let block = COMPENSATED_BLOCK * width;
            for (var j0 = lane; j0 < units; j0 += block) {
                var b1: array<vec4<f32>, ROWS_SG_R_MAX>;
                var b2: array<vec4<f32>, ROWS_SG_R_MAX>;
                let end = min(units, j0 + block);
                for (var j = j0; j < end; j += width) {
                    for (var r = 0u; r < ROWS_SG_R; r++) {
                        let t = shifted_unit_terms(base4[r] / per_unit + j, shift[r]);
                        b1[r] += t[0];
                        b2[r] += t[1];
                    }
                }
                for (var r = 0u; r < ROWS_SG_R; r++) {
                    let k1 = add_compensated4(Compensated4(s1[r], c1[r]), b1[r]);
                    let k2 = add_compensated4(Compensated4(s2[r], c2[r]), b2[r]);
                    s1[r] = k1.sum;
                    c1[r] = k1.carry;
                    s2[r] = k2.sum;
                    c2[r] = k2.carry;
                }
            }
        } else {
            // Four vectors a step, added in pairs before they meet the
            // running sums, which then take a quarter of the steps and
            // drift a quarter as far (f32 LayerNorm rows of 16384 of f16
            // values: 8 roundings per element off, 2 to 3 so), with no
            // more additions than one at a time.
            var j4 = lane;
            for (; j4 + 3u * width < n4; j4 += 4u * width) {
                for (var r = 0u; r < ROWS_SG_R; r++) {
                    let v0 = load_x4(base4[r] + j4) - shift[r];
                    let v1 = load_x4(base4[r] + j4 + width) - shift[r];
                    let v2 = load_x4(base4[r] + j4 + 2u * width) - shift[r];
                    let v3 = load_x4(base4[r] + j4 + 3u * width) - shift[r];
                    s1[r] += (v0 + v1) + (v2 + v3);
                    s2[r] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
                }
            }
            for (; j4 < n4; j4 += width) {
                for (var r = 0u; r < ROWS_SG_R; r++) {
                    let v = load_x4(base4[r] + j4) - shift[r];
                    s1[r] += v;
                    s2[r] += v * v;
                }
            }
        }
        var dmean: array<f32, ROWS_SG_R_MAX>;
        var rstd: array<f32, ROWS_SG_R_MAX>;
        for (var r = 0u; r < ROWS_SG_R; r++) {
            let t1 = subgroupAdd(hsum(compensated_total4(Compensated4(s1[r], c1[r]))));
            let t2 = subgroupAdd(hsum(compensated_total4(Compensated4(s2[r], c2[r]))));
            dmean[r] = 0.0;
            if (!IS_RMS) {
                dmean[r] = t1 / n;
            }
            // Rounding can leave a tiny negative; a NaN (inf or NaN in the
            // row) must stay NaN, as in torch, so no max() here.
            var variance = (t2 - t1 * dmean[r]) / n;
            if (variance < 0.0) {
                variance = 0.0;
            }
            rstd[r] = batch_rstd(variance);
            if (lane == 0u) {
                scratch[min(first + r, last)] = vec4<f32>(shift[r], dmean[r], rstd[r], variance);
            }
        }
        // Every row's g with one row per step; G = 1 with more.
        let g = first - fast_div(first, params.div_g) * params.g;
        if (PAIRED_ACCESS) {
            // Pairs of vectors, as in the sums.
            if (AFFINE_MODE == AFFINE_PER_QUAD && params.b % params.affine_div == 0u
                && params.affine_div % 8u == 0u && params.affine_div >= 8u * width) {
                let d8 = params.affine_div / 8u;
                for (var ch = 0u; ch < n4 / (2u * d8); ch++) {
                    let a = affine_params4(g, g * n4 + 2u * ch * d8);
                    for (var j8 = ch * d8 + lane; j8 < (ch + 1u) * d8; j8 += width) {
                        for (var r = 0u; r < ROWS_SG_R; r++) {
                            normalize_row_pair(base4[r] / 2u + j8, shift[r], dmean[r], rstd[r], a, a);
                        }
                    }
                }
            } else {
                for (var j8 = lane; j8 < n4 / 2u; j8 += width) {
                    let a0 = affine_params4(g, g * n4 + 2u * j8);
                    let a1 = affine_params4(g, g * n4 + 2u * j8 + 1u);
                    for (var r = 0u; r < ROWS_SG_R; r++) {
                        normalize_row_pair(base4[r] / 2u + j8, shift[r], dmean[r], rstd[r], a0, a1);
                    }
                }
            }
        } else if (AFFINE_MODE == AFFINE_PER_QUAD && params.b % params.affine_div == 0u
            && params.affine_div >= 4u * width) {
            // Rows of whole channels at least a step long (channels-first
            // GroupNorm): γ and β once per channel instead of a division and
            // two gathers per vector.
            let d4 = params.affine_div / 4u;
            for (var ch = 0u; ch < n4 / d4; ch++) {
                let a = affine_params4(g, g * n4 + ch * d4);
                for (var j4 = ch * d4 + lane; j4 < (ch + 1u) * d4; j4 += width) {
                    for (var r = 0u; r < ROWS_SG_R; r++) {
                        store_y4(base4[r] + j4, normalized_row4(base4[r] + j4, shift[r], dmean[r], rstd[r], a));
                    }
                }
            }
        } else {
            for (var j4 = lane; j4 < n4; j4 += width) {
                let a = affine_params4(g, g * n4 + j4);
                for (var r = 0u; r < ROWS_SG_R; r++) {
                    store_y4(base4[r] + j4, normalized_row4(base4[r] + j4, shift[r], dmean[r], rstd[r], a));
                }
            }
        }
    }
}
