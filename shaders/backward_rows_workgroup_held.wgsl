// Backward of rows the forward held in a workgroup (rows_workgroup_held.wgsl)
// on GPUs: contiguous groups (SA = 1) of whole vectors, up to HELD_K ≤ 16
// vectors per invocation. One workgroup of ROWS_WG_HELD invocations per
// group, invocation `lid` reading its vectors (lid, lid + ROWS_WG_HELD, ...)
// of x and dy once and keeping x̂ and g = dy·γ in registers for the sums and
// the store of dx. bwd_rows_subgroup reads x and dy twice with one subgroup
// per group in flight.
//
// γ is one per column (LayerNorm, RMSNorm: their dγ and dβ come from the
// column kernel afterwards) or one per channel of group_channel_len4
// vectors (InstanceNorm, channels-first GroupNorm). With BF_WRITE_PARTIALS
// the kernel also writes each channel's (Σg, Σg·x̂, Σdy, Σdy·x̂) as its
// partial, as bwd_rows_subgroup does, one workgroup sum per channel (the
// host keeps the channels per group few).
//
// The slot helpers are backward_rows_held.wgsl's; the sums go through
// workgroup memory (workgroup_total.wgsl). No subgroup operation is used,
// but the kernel lives in the subgroup part of the module with the helpers
// it shares, so the host picks it only where subgroups exist.

// γ of a slot's vector j4 of the group starting at `base` (first affine
// index c0), in channel j4 / d4; ones for a dead slot.
fn slot_group_weight4(base: u32, c0: u32, d4: u32, j4: u32, live: bool) -> vec4<f32> {
    if (live) {
        return group_weight4(base, c0, j4 / d4, j4);
    }
    return vec4<f32>(1.0);
}

fn octet_group_weight4(base: u32, c0: u32, d4: u32, j: U32x8, l: Livex8) -> Vec4x8 {
    return Vec4x8(
        slot_group_weight4(base, c0, d4, j[0], l[0]), slot_group_weight4(base, c0, d4, j[1], l[1]),
        slot_group_weight4(base, c0, d4, j[2], l[2]), slot_group_weight4(base, c0, d4, j[3], l[3]),
        slot_group_weight4(base, c0, d4, j[4], l[4]), slot_group_weight4(base, c0, d4, j[5], l[5]),
        slot_group_weight4(base, c0, d4, j[6], l[6]), slot_group_weight4(base, c0, d4, j[7], l[7]),
    );
}

// (Σg, Σg·x̂, Σdy, Σdy·x̂) of a slot if it is live and in channel ch.
fn slot_channel_terms(ch: u32, d4: u32, j4: u32, live: bool, g: vec4<f32>, xhat: vec4<f32>, dy: vec4<f32>) -> vec4<f32> {
    let t = vec4<f32>(hsum(g), dot(g, xhat), hsum(dy), dot(dy, xhat));
    return select(vec4<f32>(0.0), t, live && j4 / d4 == ch);
}

fn octet_channel_terms(ch: u32, d4: u32, j: U32x8, l: Livex8, g: Vec4x8, xhat: Vec4x8, dy: Vec4x8) -> vec4<f32> {
    return ((slot_channel_terms(ch, d4, j[0], l[0], g[0], xhat[0], dy[0])
        + slot_channel_terms(ch, d4, j[1], l[1], g[1], xhat[1], dy[1]))
        + (slot_channel_terms(ch, d4, j[2], l[2], g[2], xhat[2], dy[2])
        + slot_channel_terms(ch, d4, j[3], l[3], g[3], xhat[3], dy[3])))
        + ((slot_channel_terms(ch, d4, j[4], l[4], g[4], xhat[4], dy[4])
        + slot_channel_terms(ch, d4, j[5], l[5], g[5], xhat[5], dy[5]))
        + (slot_channel_terms(ch, d4, j[6], l[6], g[6], xhat[6], dy[6])
        + slot_channel_terms(ch, d4, j[7], l[7], g[7], xhat[7], dy[7])));
}

@compute @workgroup_size(ROWS_WG_HELD)
fn bwd_rows_workgroup_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = bwd_linear_workgroup(wid, nwg);
    if (row >= bp.sp * bp.sg) {
        return;
    }
    let n4 = bp.sb / 4u;
    let base = row * bp.sb;
    let base4 = row * n4;
    let c0 = affine_index(base);
    let d4 = group_channel_len4(n4);
    let slots = held_slots(lid, ROWS_WG_HELD, n4);
    let st = stats[row];
    let dy0 = octet_dy4(base4, slots.j0, slots.l0);
    let dy1 = octet_dy4(base4, slots.j1, slots.l1);
    let dy2 = octet_dy4(base4, slots.j2, slots.l2);
    let dy3 = octet_dy4(base4, slots.j3, slots.l3);
    let xhat0 = octet_xhat(octet_x4(base4, slots.j0, slots.l0), st, slots.l0);
    let xhat1 = octet_xhat(octet_x4(base4, slots.j1, slots.l1), st, slots.l1);
    let xhat2 = octet_xhat(octet_x4(base4, slots.j2, slots.l2), st, slots.l2);
    let xhat3 = octet_xhat(octet_x4(base4, slots.j3, slots.l3), st, slots.l3);
    let g0 = octet_mul(dy0, octet_group_weight4(base, c0, d4, slots.j0, slots.l0));
    let g1 = octet_mul(dy1, octet_group_weight4(base, c0, d4, slots.j1, slots.l1));
    let g2 = octet_mul(dy2, octet_group_weight4(base, c0, d4, slots.j2, slots.l2));
    let g3 = octet_mul(dy3, octet_group_weight4(base, c0, d4, slots.j3, slots.l3));
    let sum_g = (octet_sum(g0) + octet_sum(g1)) + (octet_sum(g2) + octet_sum(g3));
    let sum_g_xhat = (octet_dot(g0, xhat0) + octet_dot(g1, xhat1))
        + (octet_dot(g2, xhat2) + octet_dot(g3, xhat3));
    let t = workgroup_total(lid, vec4<f32>(hsum(sum_g), hsum(sum_g_xhat), 0.0, 0.0));
    if (bwd_flag(BF_WRITE_PARTIALS)) {
        let channels = n4 / d4;
        for (var ch = 0u; ch < channels; ch++) {
            let mine = (octet_channel_terms(ch, d4, slots.j0, slots.l0, g0, xhat0, dy0)
                + octet_channel_terms(ch, d4, slots.j1, slots.l1, g1, xhat1, dy1))
                + (octet_channel_terms(ch, d4, slots.j2, slots.l2, g2, xhat2, dy2)
                + octet_channel_terms(ch, d4, slots.j3, slots.l3, g3, xhat3, dy3));
            let sums = workgroup_total(lid, mine);
            if (lid == 0u) {
                work[bp.partials_offset + row * channels + ch] = sums;
            }
        }
    }
    let s = vec4<f32>(t.x, t.y, 0.0, 0.0);
    octet_store_dx(base4, slots.j0, slots.l0, g0, xhat0, s, st);
    octet_store_dx(base4, slots.j1, slots.l1, g1, xhat1, s, st);
    octet_store_dx(base4, slots.j2, slots.l2, g2, xhat2, s, st);
    octet_store_dx(base4, slots.j3, slots.l3, g3, xhat3, s, st);
}
