// Fused normalize-scale-shift pass.
//
// One invocation writes NORMALIZE_VEC4 aligned groups of four elements of
// the bound chunk, NORMALIZE_WG groups apart (so a workgroup's loads are
// contiguous), each from its group's statistics at scratch[group] and its
// affine index. Any [P, A, G, B] view works; when B is a multiple of four,
// the four elements share one statistics group and load and store as one
// vector. The chunk's last one to three elements (when its length is not a
// multiple of four) are written as pairs by invocation 0 of workgroup 0, so
// packed f16/bf16 words are still written whole by one invocation.

// (p, g, b) of a flat element index. Divisions by 1 are skipped (uniform
// branches): BatchNorm has P = 1, LayerNorm G = 1, channels-last B = 1.
fn position(global: u32) -> vec3<u32> {
    var ab = global;
    if (params.b != 1u) {
        ab = fast_div(global, params.div_b);
    }
    let b = global - ab * params.b;
    var pa = ab;
    var g = 0u;
    if (params.g != 1u) {
        pa = fast_div(ab, params.div_g);
        g = ab - pa * params.g;
    }
    var p = 0u;
    if (params.p != 1u) {
        if (params.a == 1u) {
            p = pa;
        } else {
            p = fast_div(global, params.div_agb);
        }
    }
    return vec3<u32>(p, g, b);
}

fn normalized_at(i: u32) -> f32 {
    let pos = position(params.chunk_base + i);
    return normalize_value(load_x(i), scratch[pos.x * params.g + pos.y], pos.y, pos.z);
}

// y for the aligned group of four elements t of the chunk.
fn normalized4(t: u32) -> vec4<f32> {
    let first = 4u * t;
    if (params.b % 4u == 0u) {
        let pos = position(params.chunk_base + first);
        let st = scratch[pos.x * params.g + pos.y];
        return affine4(((load_x4(t) - st.x) - st.y) * st.z, pos.y, pos.z);
    }
    return vec4<f32>(
        normalized_at(first),
        normalized_at(first + 1u),
        normalized_at(first + 2u),
        normalized_at(first + 3u),
    );
}

@compute @workgroup_size(NORMALIZE_WG)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Whole groups of four in the main loop; no early exit inside it (a
    // divergent return or a nested loop there made lavapipe 5x slower).
    let full = params.chunk_len / 4u;
    let first_t = linear_workgroup(wid, nwg) * NORMALIZE_VEC4 * NORMALIZE_WG + lid;
    for (var k = 0u; k < NORMALIZE_VEC4; k++) {
        let t = first_t + k * NORMALIZE_WG;
        if (t < full) {
            store_y4(t, normalized4(t));
        }
    }
    // The chunk's last one to three elements, as pairs, by one invocation.
    if (linear_workgroup(wid, nwg) == 0u && lid == 0u && 4u * full < params.chunk_len) {
        for (var i = 4u * full; i < params.chunk_len; i += 2u) {
            let second = i + 1u < params.chunk_len;
            var v1 = 0.0;
            if (second) {
                v1 = normalized_at(i + 1u);
            }
            store_y2(i, normalized_at(i), v1, second);
        }
    }
}
