// Row kernel for GPUs, for rows too long for a subgroup's held slots
// (rows_held.wgsl) and up to HELD_K ≤ 16 vectors per invocation: one
// workgroup of ROWS_WG_HELD invocations per row (A = 1, B a multiple of 4),
// invocation `lid` keeping the vectors lid, lid + ROWS_WG_HELD, ... of the
// row in registers (the slots of held_slots.wgsl) from the load to the
// store. x is read once and y written once, the floor of a normalization;
// the standard layout of the fast CUDA LayerNorms (a block per row, the row
// in registers). Rows that a subgroup walks alone keep one warp per row in
// flight, far too few memory requests to fill a GPU's bandwidth.
//
// Reductions go through workgroup memory (workgroup_total.wgsl), so no
// subgroup operation is needed: any adapter can run it. CPU adapters never
// get it: lavapipe runs a barrier by switching coroutines, which carried
// all the held state and ran 4x slower than two reads of x.
//
// Statistics as in rows_held: the mean m0 of the held values, then Σd and
// Σd² of d = x − m0, a corrected two-pass mean and variance (SPEC §6).
// Stored as vec4(shift = m0, dmean, rstd, var), as the other kernels do.

// y of a live slot of row group g (zeros for a dead one); γ and β are
// read here (a GPU's cache serves them to every row).
fn slot_y_row(g: u32, j4: u32, live: bool, v: vec4<f32>, m0: f32, dmean: f32, rstd: f32) -> vec4<f32> {
    if (live) {
        let a = affine_params4(g, g * (params.b / 4u) + j4);
        return apply_affine4(((v - m0) - dmean) * rstd, a);
    }
    return vec4<f32>(0.0);
}

// Stores y of an octet's live slots, two slots at a time (slots_store_y4).
fn octet_store_row(base4: u32, g: u32, j: U32x8, l: Livex8, v: Vec4x8, m0: f32, dmean: f32, rstd: f32) {
    slots_store_y4(base4, j[0], j[1], l[0], l[1], slot_y_row(g, j[0], l[0], v[0], m0, dmean, rstd), slot_y_row(g, j[1], l[1], v[1], m0, dmean, rstd));
    slots_store_y4(base4, j[2], j[3], l[2], l[3], slot_y_row(g, j[2], l[2], v[2], m0, dmean, rstd), slot_y_row(g, j[3], l[3], v[3], m0, dmean, rstd));
    slots_store_y4(base4, j[4], j[5], l[4], l[5], slot_y_row(g, j[4], l[4], v[4], m0, dmean, rstd), slot_y_row(g, j[5], l[5], v[5], m0, dmean, rstd));
    slots_store_y4(base4, j[6], j[7], l[6], l[7], slot_y_row(g, j[6], l[6], v[6], m0, dmean, rstd), slot_y_row(g, j[7], l[7], v[7], m0, dmean, rstd));
}

@compute @workgroup_size(ROWS_WG_HELD)
fn rows_workgroup_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = linear_workgroup(wid, nwg);
    if (row >= params.n_groups) {
        return;
    }
    let n4 = params.b / 4u;
    let n = f32(params.b);
    let slots = held_slots(lid, ROWS_WG_HELD, n4);
    let base4 = row * n4;
    let v0 = octet_x4(base4, slots.j0, slots.l0);
    let v1 = octet_x4(base4, slots.j1, slots.l1);
    let v2 = octet_x4(base4, slots.j2, slots.l2);
    let v3 = octet_x4(base4, slots.j3, slots.l3);
    var m0 = 0.0;
    if (!IS_RMS) {
        let s = (octet_sum(v0) + octet_sum(v1)) + (octet_sum(v2) + octet_sum(v3));
        m0 = workgroup_total(lid, vec4<f32>(hsum(s), 0.0, 0.0, 0.0)).x / n;
    }
    let c0 = octet_centered_sums(v0, m0, slots.l0);
    let c1 = octet_centered_sums(v1, m0, slots.l1);
    let c2 = octet_centered_sums(v2, m0, slots.l2);
    let c3 = octet_centered_sums(v3, m0, slots.l3);
    let s1 = (c0.s + c1.s) + (c2.s + c3.s);
    let s2 = (c0.q + c1.q) + (c2.q + c3.q);
    let t = workgroup_total(lid, vec4<f32>(hsum(s1), hsum(s2), 0.0, 0.0));
    var dmean = 0.0;
    var t1 = 0.0;
    if (!IS_RMS) {
        t1 = t.x;
        dmean = t1 / n;
    }
    // Rounding can leave a tiny negative; a NaN (inf or NaN in the row)
    // must stay NaN, as in torch, so no max() here.
    var variance = (t.y - t1 * dmean) / n;
    if (variance < 0.0) {
        variance = 0.0;
    }
    let rstd = batch_rstd(variance);
    if (lid == 0u) {
        scratch[row] = vec4<f32>(m0, dmean, rstd, variance);
    }
    let g = row - fast_div(row, params.div_g) * params.g;
    octet_store_row(base4, g, slots.j0, slots.l0, v0, m0, dmean, rstd);
    octet_store_row(base4, g, slots.j1, slots.l1, v1, m0, dmean, rstd);
    octet_store_row(base4, g, slots.j2, slots.l2, v2, m0, dmean, rstd);
    octet_store_row(base4, g, slots.j3, slots.l3, v3, m0, dmean, rstd);
}
