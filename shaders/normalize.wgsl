// Fused normalize-scale-shift pass.
//
// One invocation writes NORMALIZE_PER_THREAD consecutive elements of y (an
// even count starting at an even index, so packed f16/bf16 words are written
// whole by one invocation), each from its group's statistics at
// scratch[group] and its affine index. Any [P, A, G, B] view works: the group
// and affine index are recomputed per element from the flat index.

// y at local index i of the bound chunk.
fn normalized_at(i: u32) -> f32 {
    let global = params.chunk_base + i;
    let b = global % params.b;
    let g = (global / params.b) % params.g;
    let p = global / (params.a * params.g * params.b);
    return normalize_value(load_x(i), scratch[p * params.g + g], g, b);
}

@compute @workgroup_size(NORMALIZE_WG)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = (linear_workgroup(wid, nwg) * NORMALIZE_WG + lid) * NORMALIZE_PER_THREAD;
    for (var k = 0u; k < NORMALIZE_PER_THREAD; k += 2u) {
        let i = first + k;
        if (i >= params.chunk_len) {
            return;
        }
        let second = i + 1u < params.chunk_len;
        var v1 = 0.0;
        if (second) {
            v1 = normalized_at(i + 1u);
        }
        store_y2(i, normalized_at(i), v1, second);
    }
}
