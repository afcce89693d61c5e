// Fused normalize-scale-shift pass.
//
// One invocation writes NORMALIZE_PER_THREAD consecutive elements of y,
// each from its group's statistics at scratch[group] and its affine index.
// Any [P, A, G, B] view works: the group and affine index are recomputed per
// element from the flat index.

@compute @workgroup_size(NORMALIZE_WG)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = (linear_workgroup(wid, nwg) * NORMALIZE_WG + lid) * NORMALIZE_PER_THREAD;
    for (var k = 0u; k < NORMALIZE_PER_THREAD; k++) {
        let i = first + k;
        if (i >= params.total) {
            return;
        }
        let b = i % params.b;
        let g = (i / params.b) % params.g;
        let p = i / (params.a * params.g * params.b);
        let st = scratch[p * params.g + g];
        store_y(i, normalize_value(load_x(i), st, g, b));
    }
}
