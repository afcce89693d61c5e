// Backward row kernel on subgroups, for adapters with Features::SUBGROUP:
// one subgroup per contiguous group of the stats view (SA = 1, SB a
// multiple of four, BWD_VEC4), several groups per workgroup, sums with
// subgroupAdd and no workgroup barrier (the forward's rows_subgroup, same
// slot scheme). The subgroup size is read at run time (8 on lavapipe, 32
// on NVIDIA, 32 or 64 on AMD): nothing assumes one. Appended to the
// backward source only for this kernel, so adapters without subgroups
// never compile it.

@compute @workgroup_size(BWD_SG_WG)
fn bwd_rows_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let rows = subgroup_rows(lane, sg, BWD_SG_WG, bwd_linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let width = rows.width;
    let n = bp.sb;
    let n4 = n / 4u;
    for (var group = rows.first; group < bp.sp * bp.sg; group += rows.stride) {
        let base = group * n;
        let base4 = group * n4;
        let st = stats[group];
        let c0 = affine_index(base);
        // Channel by channel, as bwd_rows.
        let d4 = group_channel_len4(n4);
        let channels = n4 / d4;
        var s = vec4<f32>(0.0);
        for (var ch = 0u; ch < channels; ch++) {
            var acc = vec4<f32>(0.0);
            for (var j4 = ch * d4 + lane; j4 < (ch + 1u) * d4; j4 += width) {
                acc += terms4(base4 + j4, st, group_weight4(base, c0, ch, j4));
            }
            let sc = subgroupAdd(acc);
            if (lane == 0u && bwd_flag(BF_WRITE_PARTIALS)) {
                work[bp.partials_offset + group * channels + ch] = sc;
            }
            s += sc;
        }
        for (var ch = 0u; ch < channels; ch++) {
            for (var j4 = ch * d4 + lane; j4 < (ch + 1u) * d4; j4 += width) {
                store_dx4(base4 + j4, grad_input4(base4 + j4, s, st, group_weight4(base, c0, ch, j4)));
            }
        }
    }
}
