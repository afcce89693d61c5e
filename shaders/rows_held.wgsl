// Row kernel that reads x once, for rows that all share their affine
// parameters (G = 1: LayerNorm and RMSNorm, B a multiple of 4) and fit in
// HELD_K ≤ 32 vectors per lane. One subgroup per row, as in rows_subgroup,
// but each lane keeps its vectors of the row (lane, lane + width, ...) in
// registers from the load to the store, and loads its γ and β once for
// every row it walks (a lane owns the same columns in each row).
//
// Why: lavapipe makes every storage access a scalar access per lane and
// component, so time follows the count of accesses per element.
// rows_subgroup reads x twice and shares γ/β over four rows (three and a
// half accesses); this kernel reads x and writes y (two), like the copy.
// Each subgroup walks a block of contiguous rows (the host sizes it), so the
// CPU thread running it streams through memory; walking rows a grid-stride
// apart was 1.3x slower. On lavapipe (fraction of the copy kernel), rows of
// 256 went from 0.45 to about 1.0, rows of 1024 from 0.55 to about 0.75.
//
// The slots are those of held_slots.wgsl: four octets, HELD_K in use; for
// half storage of rows of whole pairs of vectors, in adjacent pairs loaded
// and stored with one 16-byte access each (PAIRED_ACCESS).
//
// Statistics: the mean m0 of the held values, then Σd and Σd² of
// d = x − m0 (exact for values near m0). dmean = Σd/n corrects m0's
// rounding and var = (Σd² − Σd·dmean)/n is a two-pass variance, so neither a
// large common offset nor an outlier costs digits (SPEC §6). Stored as
// vec4(shift = m0, dmean, rstd, var), as the other kernels do.
alias Affine4x8 = array<Affine4, 8>;

fn slot_affine(j4: u32, live: bool) -> Affine4 {
    if (live) {
        return affine_params4(0u, j4);
    }
    return Affine4(vec4<f32>(1.0), vec4<f32>(0.0));
}

fn octet_affine(j: U32x8, l: Livex8) -> Affine4x8 {
    return Affine4x8(
        slot_affine(j[0], l[0]), slot_affine(j[1], l[1]), slot_affine(j[2], l[2]), slot_affine(j[3], l[3]),
        slot_affine(j[4], l[4]), slot_affine(j[5], l[5]), slot_affine(j[6], l[6]), slot_affine(j[7], l[7]),
    );
}

fn slot_y(v: vec4<f32>, m0: f32, dmean: f32, rstd: f32, a: Affine4) -> vec4<f32> {
    return apply_affine4(((v - m0) - dmean) * rstd, a);
}

// Stores y of an octet's live slots, two slots at a time (slots_store_y4).
fn octet_store(base4: u32, j: U32x8, l: Livex8, v: Vec4x8, m0: f32, dmean: f32, rstd: f32, a: Affine4x8) {
    slots_store_y4(base4, j[0], j[1], l[0], l[1], slot_y(v[0], m0, dmean, rstd, a[0]), slot_y(v[1], m0, dmean, rstd, a[1]));
    slots_store_y4(base4, j[2], j[3], l[2], l[3], slot_y(v[2], m0, dmean, rstd, a[2]), slot_y(v[3], m0, dmean, rstd, a[3]));
    slots_store_y4(base4, j[4], j[5], l[4], l[5], slot_y(v[4], m0, dmean, rstd, a[4]), slot_y(v[5], m0, dmean, rstd, a[5]));
    slots_store_y4(base4, j[6], j[7], l[6], l[7], slot_y(v[6], m0, dmean, rstd, a[6]), slot_y(v[7], m0, dmean, rstd, a[7]));
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
    let slots = held_slots(lane, w, n4);
    let a0 = octet_affine(slots.j0, slots.l0);
    let a1 = octet_affine(slots.j1, slots.l1);
    let a2 = octet_affine(slots.j2, slots.l2);
    let a3 = octet_affine(slots.j3, slots.l3);
    let rows = subgroup_block(steps, params.n_groups);
    for (var row = rows.x; row < rows.y; row++) {
        let base4 = row * n4;
        let v0 = octet_x4(base4, slots.j0, slots.l0);
        let v1 = octet_x4(base4, slots.j1, slots.l1);
        let v2 = octet_x4(base4, slots.j2, slots.l2);
        let v3 = octet_x4(base4, slots.j3, slots.l3);
        var m0 = 0.0;
        if (!IS_RMS) {
            let s = (octet_sum(v0) + octet_sum(v1)) + (octet_sum(v2) + octet_sum(v3));
            m0 = subgroupAdd(hsum(s)) / n;
        }
        let c0 = octet_centered_sums(v0, m0, slots.l0);
        let c1 = octet_centered_sums(v1, m0, slots.l1);
        let c2 = octet_centered_sums(v2, m0, slots.l2);
        let c3 = octet_centered_sums(v3, m0, slots.l3);
        var dmean = 0.0;
        var t1 = 0.0;
        if (!IS_RMS) {
            let s = (c0.s + c1.s) + (c2.s + c3.s);
            t1 = subgroupAdd(hsum(s));
            dmean = t1 / n;
        }
        let s2 = (c0.q + c1.q) + (c2.q + c3.q);
        // Rounding can leave a tiny negative; a NaN (inf or NaN in the row)
        // must stay NaN, as in torch, so no max() here.
        var variance = (subgroupAdd(hsum(s2)) - t1 * dmean) / n;
        if (variance < 0.0) {
            variance = 0.0;
        }
        let rstd = batch_rstd(variance);
        if (lane == 0u) {
            scratch[row] = vec4<f32>(m0, dmean, rstd, variance);
        }
        octet_store(base4, slots.j0, slots.l0, v0, m0, dmean, rstd, a0);
        octet_store(base4, slots.j1, slots.l1, v1, m0, dmean, rstd, a1);
        octet_store(base4, slots.j2, slots.l2, v2, m0, dmean, rstd, a2);
        octet_store(base4, slots.j3, slots.l3, v3, m0, dmean, rstd, a3);
    }
}
