// Row kernel that reads x once, for short rows that all share their affine
// parameters (G = 1: LayerNorm and RMSNorm, B a multiple of 4, at most
// HELD_SLOTS vectors per lane). One subgroup per row, as in rows_subgroup,
// but each lane keeps its HELD_K vectors of the row (lane, lane + width,
// ...) in registers from the load to the store, and loads its γ and β once
// for every row it walks (a lane owns the same columns in each row).
//
// Why: lavapipe makes every storage access a scalar access per lane and
// component, so time follows the count of accesses per element.
// rows_subgroup reads x twice and shares γ/β over four rows (three and a
// half accesses); this kernel reads x and writes y (two), like the copy.
// Each subgroup walks a block of contiguous rows (the host sizes it), so the
// CPU thread running it streams through memory; walking rows a grid-stride
// apart was 1.3x slower. On lavapipe, LayerNorm 16384x256 went from 0.45 to
// about 0.92 of the copy kernel (8.2 to 4.0 ms), 65536x64 from 0.35 to 0.83.
//
// The slots are written out as eight values with constant indices, not a
// loop over an array: lavapipe kept a looped array in memory and ran 14%
// slower. HELD_K (an override) marks the slots in use; the others fold
// away. Lanes whose vector lies past the row (width·HELD_K > B/4) hold
// zeros and store nothing.
//
// Statistics: the mean m0 of the held values, then Σd and Σd² of
// d = x − m0 (exact for values near m0). dmean = Σd/n corrects m0's
// rounding and var = (Σd² − Σd·dmean)/n is a two-pass variance, so neither a
// large common offset nor an outlier costs digits (SPEC §6). Stored as
// vec4(shift = m0, dmean, rstd, var), as the other kernels do.
const HELD_SLOTS: u32 = 8u;

// Vector j4 of a row starting at vector base4 when the slot is live, else 0.
fn held_x4(base4: u32, j4: u32, live: bool) -> vec4<f32> {
    if (live) {
        return load_x4(base4 + j4);
    }
    return vec4<f32>(0.0);
}

// v − m0 for a live slot, 0 for the others (they add nothing to the sums).
fn held_centered(v: vec4<f32>, m0: f32, live: bool) -> vec4<f32> {
    return select(vec4<f32>(0.0), v - m0, live);
}

fn held_affine(j4: u32, live: bool) -> Affine4 {
    if (live) {
        return affine_params4(0u, j4);
    }
    return Affine4(vec4<f32>(1.0), vec4<f32>(0.0));
}

fn held_store(base4: u32, j4: u32, live: bool, d: vec4<f32>, dmean: f32, rstd: f32, a: Affine4) {
    if (live) {
        store_y4(base4 + j4, apply_affine4((d - dmean) * rstd, a));
    }
}

fn sum8(v: array<vec4<f32>, HELD_SLOTS>) -> vec4<f32> {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

fn sum_squares8(v: array<vec4<f32>, HELD_SLOTS>) -> vec4<f32> {
    return ((v[0] * v[0] + v[1] * v[1]) + (v[2] * v[2] + v[3] * v[3]))
        + ((v[4] * v[4] + v[5] * v[5]) + (v[6] * v[6] + v[7] * v[7]));
}

@compute @workgroup_size(ROWS_SG_WG)
fn rows_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, ROWS_SG_WG, linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let w = steps.width;
    let n4 = params.b / 4u;
    let n = f32(params.b);
    let j = array<u32, HELD_SLOTS>(
        lane, lane + w, lane + 2u * w, lane + 3u * w,
        lane + 4u * w, lane + 5u * w, lane + 6u * w, lane + 7u * w,
    );
    let live = array<bool, HELD_SLOTS>(
        0u < HELD_K && j[0] < n4, 1u < HELD_K && j[1] < n4,
        2u < HELD_K && j[2] < n4, 3u < HELD_K && j[3] < n4,
        4u < HELD_K && j[4] < n4, 5u < HELD_K && j[5] < n4,
        6u < HELD_K && j[6] < n4, 7u < HELD_K && j[7] < n4,
    );
    let a = array<Affine4, HELD_SLOTS>(
        held_affine(j[0], live[0]), held_affine(j[1], live[1]),
        held_affine(j[2], live[2]), held_affine(j[3], live[3]),
        held_affine(j[4], live[4]), held_affine(j[5], live[5]),
        held_affine(j[6], live[6]), held_affine(j[7], live[7]),
    );
    // Each subgroup walks a contiguous block of rows: a CPU thread running
    // it streams through memory.
    let per = (params.n_groups + steps.stride - 1u) / steps.stride;
    let end = min(steps.first * per + per, params.n_groups);
    for (var row = steps.first * per; row < end; row++) {
        let base4 = row * n4;
        let v = array<vec4<f32>, HELD_SLOTS>(
            held_x4(base4, j[0], live[0]), held_x4(base4, j[1], live[1]),
            held_x4(base4, j[2], live[2]), held_x4(base4, j[3], live[3]),
            held_x4(base4, j[4], live[4]), held_x4(base4, j[5], live[5]),
            held_x4(base4, j[6], live[6]), held_x4(base4, j[7], live[7]),
        );
        var m0 = 0.0;
        if (!IS_RMS) {
            m0 = subgroupAdd(hsum(sum8(v))) / n;
        }
        let d = array<vec4<f32>, HELD_SLOTS>(
            held_centered(v[0], m0, live[0]), held_centered(v[1], m0, live[1]),
            held_centered(v[2], m0, live[2]), held_centered(v[3], m0, live[3]),
            held_centered(v[4], m0, live[4]), held_centered(v[5], m0, live[5]),
            held_centered(v[6], m0, live[6]), held_centered(v[7], m0, live[7]),
        );
        var dmean = 0.0;
        var t1 = 0.0;
        if (!IS_RMS) {
            t1 = subgroupAdd(hsum(sum8(d)));
            dmean = t1 / n;
        }
        // Rounding can leave a tiny negative; a NaN (inf or NaN in the row)
        // must stay NaN, as in torch, so no max() here.
        var variance = (subgroupAdd(hsum(sum_squares8(d))) - t1 * dmean) / n;
        if (variance < 0.0) {
            variance = 0.0;
        }
        let rstd = 1.0 / sqrt(variance + params.eps);
        if (lane == 0u) {
            scratch[row] = vec4<f32>(m0, dmean, rstd, variance);
        }
        held_store(base4, j[0], live[0], d[0], dmean, rstd, a[0]);
        held_store(base4, j[1], live[1], d[1], dmean, rstd, a[1]);
        held_store(base4, j[2], live[2], d[2], dmean, rstd, a[2]);
        held_store(base4, j[3], live[3], d[3], dmean, rstd, a[3]);
        held_store(base4, j[4], live[4], d[4], dmean, rstd, a[4]);
        held_store(base4, j[5], live[5], d[5], dmean, rstd, a[5]);
        held_store(base4, j[6], live[6], d[6], dmean, rstd, a[6]);
        held_store(base4, j[7], live[7], d[7], dmean, rstd, a[7]);
    }
}
