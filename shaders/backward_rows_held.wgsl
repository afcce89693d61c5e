// Backward of the rows the forward held in registers (rows_held.wgsl):
// LayerNorm and RMSNorm rows that share γ (one per column), of whole
// vectors, at most HELD_K ≤ 32 vectors per lane (held_slots.wgsl). One
// subgroup per row; each lane reads its vectors of x and dy once, keeps
// x̂ and g = dy·γ in registers for the two sums and the store of dx, and
// holds its γ for every row it walks.
//
// Rows come in blocks of bp.rows_per_block contiguous rows (bp.tiles
// blocks), which subgroups take in turn. With BWD_COLUMN_SUMS a lane also
// adds up dy and dy·x̂ of its columns over the block's rows in registers and
// writes them once per block as the block's column sums (column_sums_slot,
// the block as the step); bwd_column_sums adds the blocks into dβ and dγ.
// So an element costs a read of x, a read of dy and a store of dx, against
// two reads of each in bwd_rows_subgroup. For half storage of rows of whole
// pairs of vectors the slots come in pairs (PAIRED_ACCESS), and x, dy and dx
// move by 16-byte accesses (backward_io_half_pairs.wgsl).
alias Weight4x8 = array<vec4<f32>, 8>;

fn slot_dy4(base4: u32, j4: u32, live: bool) -> vec4<f32> {
    if (live) {
        return load_dy4(base4 + j4);
    }
    return vec4<f32>(0.0);
}

// dy of two consecutive slots, as slots_x4 (held_slots.wgsl) loads x.
fn slots_dy4(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool) -> Vec4x2 {
    if (PAIRED_ACCESS) {
        if (l0) {
            return load_dy8((base4 + j0) >> 1u);
        }
        return Vec4x2(vec4<f32>(0.0), vec4<f32>(0.0));
    }
    return Vec4x2(slot_dy4(base4, j0, l0), slot_dy4(base4, j1, l1));
}

fn octet_dy4(base4: u32, j: U32x8, l: Livex8) -> Vec4x8 {
    let p0 = slots_dy4(base4, j[0], j[1], l[0], l[1]);
    let p1 = slots_dy4(base4, j[2], j[3], l[2], l[3]);
    let p2 = slots_dy4(base4, j[4], j[5], l[4], l[5]);
    let p3 = slots_dy4(base4, j[6], j[7], l[6], l[7]);
    return Vec4x8(p0[0], p0[1], p1[0], p1[1], p2[0], p2[1], p3[0], p3[1]);
}

// γ of a slot's four columns (one per column: BWD_AFFINE 0), or ones.
fn slot_weight4(j4: u32, live: bool) -> vec4<f32> {
    if (BWD_WEIGHT && live) {
        return weight[j4];
    }
    return vec4<f32>(1.0);
}

fn octet_weight4(j: U32x8, l: Livex8) -> Weight4x8 {
    return Weight4x8(
        slot_weight4(j[0], l[0]), slot_weight4(j[1], l[1]), slot_weight4(j[2], l[2]), slot_weight4(j[3], l[3]),
        slot_weight4(j[4], l[4]), slot_weight4(j[5], l[5]), slot_weight4(j[6], l[6]), slot_weight4(j[7], l[7]),
    );
}

// x̂ of a live slot, 0 for the others (they add nothing to any sum).
fn slot_xhat(x: vec4<f32>, st: vec4<f32>, live: bool) -> vec4<f32> {
    return select(vec4<f32>(0.0), ((x - st.x) - st.y) * st.z, live);
}

fn octet_xhat(x: Vec4x8, st: vec4<f32>, l: Livex8) -> Vec4x8 {
    return Vec4x8(
        slot_xhat(x[0], st, l[0]), slot_xhat(x[1], st, l[1]), slot_xhat(x[2], st, l[2]), slot_xhat(x[3], st, l[3]),
        slot_xhat(x[4], st, l[4]), slot_xhat(x[5], st, l[5]), slot_xhat(x[6], st, l[6]), slot_xhat(x[7], st, l[7]),
    );
}

// Stores dx0 and dx1 of two consecutive slots where live: one access per
// pair where PAIRED_ACCESS (as slots_store_y4 in the forward).
fn slots_store_dx(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool, dx0: vec4<f32>, dx1: vec4<f32>) {
    if (PAIRED_ACCESS) {
        if (l0) {
            store_dx8((base4 + j0) >> 1u, dx0, dx1);
        }
        return;
    }
    if (l0) {
        store_dx4(base4 + j0, dx0);
    }
    if (l1) {
        store_dx4(base4 + j1, dx1);
    }
}

fn octet_store_dx(base4: u32, j: U32x8, l: Livex8, g: Vec4x8, xhat: Vec4x8, s: vec4<f32>, st: vec4<f32>) {
    slots_store_dx(base4, j[0], j[1], l[0], l[1], grad_from(g[0], xhat[0], s, st), grad_from(g[1], xhat[1], s, st));
    slots_store_dx(base4, j[2], j[3], l[2], l[3], grad_from(g[2], xhat[2], s, st), grad_from(g[3], xhat[3], s, st));
    slots_store_dx(base4, j[4], j[5], l[4], l[5], grad_from(g[4], xhat[4], s, st), grad_from(g[5], xhat[5], s, st));
    slots_store_dx(base4, j[6], j[7], l[6], l[7], grad_from(g[6], xhat[6], s, st), grad_from(g[7], xhat[7], s, st));
}

fn slot_column_sums(block: u32, j4: u32, live: bool, dy: vec4<f32>, dy_xhat: vec4<f32>) {
    if (live) {
        let at = column_sums_slot(block, j4);
        work[at] = dy;
        work[at + 8u] = dy_xhat;
    }
}

fn octet_column_sums(block: u32, j: U32x8, l: Livex8, dy: Vec4x8, dy_xhat: Vec4x8) {
    slot_column_sums(block, j[0], l[0], dy[0], dy_xhat[0]);
    slot_column_sums(block, j[1], l[1], dy[1], dy_xhat[1]);
    slot_column_sums(block, j[2], l[2], dy[2], dy_xhat[2]);
    slot_column_sums(block, j[3], l[3], dy[3], dy_xhat[3]);
    slot_column_sums(block, j[4], l[4], dy[4], dy_xhat[4]);
    slot_column_sums(block, j[5], l[5], dy[5], dy_xhat[5]);
    slot_column_sums(block, j[6], l[6], dy[6], dy_xhat[6]);
    slot_column_sums(block, j[7], l[7], dy[7], dy_xhat[7]);
}

@compute @workgroup_size(BWD_SG_WG)
fn bwd_rows_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, BWD_SG_WG, bwd_linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let w = steps.width;
    let n4 = bp.sb / 4u;
    let rows = bp.sp * bp.sg;
    let slots = held_slots(lane, w, n4);
    let w0 = octet_weight4(slots.j0, slots.l0);
    let w1 = octet_weight4(slots.j1, slots.l1);
    let w2 = octet_weight4(slots.j2, slots.l2);
    let w3 = octet_weight4(slots.j3, slots.l3);
    for (var block = steps.first; block < bp.tiles; block += steps.stride) {
        var col_dy0: Vec4x8;
        var col_dy1: Vec4x8;
        var col_dy2: Vec4x8;
        var col_dy3: Vec4x8;
        var col_dy_xhat0: Vec4x8;
        var col_dy_xhat1: Vec4x8;
        var col_dy_xhat2: Vec4x8;
        var col_dy_xhat3: Vec4x8;
        let end = min(block * bp.rows_per_block + bp.rows_per_block, rows);
        for (var row = block * bp.rows_per_block; row < end; row++) {
            let base4 = row * n4;
            let st = stats[row];
            let dy0 = octet_dy4(base4, slots.j0, slots.l0);
            let dy1 = octet_dy4(base4, slots.j1, slots.l1);
            let dy2 = octet_dy4(base4, slots.j2, slots.l2);
            let dy3 = octet_dy4(base4, slots.j3, slots.l3);
            let xhat0 = octet_xhat(octet_x4(base4, slots.j0, slots.l0), st, slots.l0);
            let xhat1 = octet_xhat(octet_x4(base4, slots.j1, slots.l1), st, slots.l1);
            let xhat2 = octet_xhat(octet_x4(base4, slots.j2, slots.l2), st, slots.l2);
            let xhat3 = octet_xhat(octet_x4(base4, slots.j3, slots.l3), st, slots.l3);
            let g0 = octet_mul(dy0, w0);
            let g1 = octet_mul(dy1, w1);
            let g2 = octet_mul(dy2, w2);
            let g3 = octet_mul(dy3, w3);
            let sum_g = (octet_sum(g0) + octet_sum(g1)) + (octet_sum(g2) + octet_sum(g3));
            let sum_g_xhat = (octet_dot(g0, xhat0) + octet_dot(g1, xhat1))
                + (octet_dot(g2, xhat2) + octet_dot(g3, xhat3));
            let s = vec4<f32>(subgroupAdd(hsum(sum_g)), subgroupAdd(hsum(sum_g_xhat)), 0.0, 0.0);
            octet_store_dx(base4, slots.j0, slots.l0, g0, xhat0, s, st);
            octet_store_dx(base4, slots.j1, slots.l1, g1, xhat1, s, st);
            octet_store_dx(base4, slots.j2, slots.l2, g2, xhat2, s, st);
            octet_store_dx(base4, slots.j3, slots.l3, g3, xhat3, s, st);
            if (BWD_COLUMN_SUMS) {
                col_dy0 = octet_add(col_dy0, dy0);
                col_dy1 = octet_add(col_dy1, dy1);
                col_dy2 = octet_add(col_dy2, dy2);
                col_dy3 = octet_add(col_dy3, dy3);
                col_dy_xhat0 = octet_add(col_dy_xhat0, octet_mul(dy0, xhat0));
                col_dy_xhat1 = octet_add(col_dy_xhat1, octet_mul(dy1, xhat1));
                col_dy_xhat2 = octet_add(col_dy_xhat2, octet_mul(dy2, xhat2));
                col_dy_xhat3 = octet_add(col_dy_xhat3, octet_mul(dy3, xhat3));
            }
        }
        if (BWD_COLUMN_SUMS) {
            octet_column_sums(block, slots.j0, slots.l0, col_dy0, col_dy_xhat0);
            octet_column_sums(block, slots.j1, slots.l1, col_dy1, col_dy_xhat1);
            octet_column_sums(block, slots.j2, slots.l2, col_dy2, col_dy_xhat2);
            octet_column_sums(block, slots.j3, slots.l3, col_dy3, col_dy_xhat3);
        }
    }
}
