// Backward of LayerNorm and RMSNorm rows on GPUs, for rows too long for a
// subgroup's held slots (backward_rows_held.wgsl) and up to HELD_K ≤ 16
// vectors per invocation: one workgroup of ROWS_WG_HELD invocations per row,
// invocation `lid` reading its vectors (lid, lid + ROWS_WG_HELD, ...) of x
// and dy once and keeping x̂ and g = dy·γ in registers for the two sums and
// the store of dx. bwd_rows_subgroup reads x and dy twice with one subgroup
// per row in flight; the column kernel (bwd_cols) still reads them again
// for dγ and dβ, which a GPU needs spread over thousands of invocations.
//
// The slot helpers are backward_rows_held.wgsl's; the sums go through
// workgroup memory (workgroup_total.wgsl). No subgroup operation is used,
// but the kernel lives in the subgroup part of the module with the helpers
// it shares, so the host picks it only where subgroups exist.
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
    let slots = held_slots(lid, ROWS_WG_HELD, n4);
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
    let g0 = octet_mul(dy0, octet_weight4(slots.j0, slots.l0));
    let g1 = octet_mul(dy1, octet_weight4(slots.j1, slots.l1));
    let g2 = octet_mul(dy2, octet_weight4(slots.j2, slots.l2));
    let g3 = octet_mul(dy3, octet_weight4(slots.j3, slots.l3));
    let sum_g = (octet_sum(g0) + octet_sum(g1)) + (octet_sum(g2) + octet_sum(g3));
    let sum_g_xhat = (octet_dot(g0, xhat0) + octet_dot(g1, xhat1))
        + (octet_dot(g2, xhat2) + octet_dot(g3, xhat3));
    let t = workgroup_total(lid, vec2<f32>(hsum(sum_g), hsum(sum_g_xhat)));
    let s = vec4<f32>(t.x, t.y, 0.0, 0.0);
    octet_store_dx(base4, slots.j0, slots.l0, g0, xhat0, s, st);
    octet_store_dx(base4, slots.j1, slots.l1, g1, xhat1, s, st);
    octet_store_dx(base4, slots.j2, slots.l2, g2, xhat2, s, st);
    octet_store_dx(base4, slots.j3, slots.l3, g3, xhat3, s, st);
}
