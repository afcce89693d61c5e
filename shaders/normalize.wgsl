// Fused normalize-scale-shift pass.
//
// One invocation writes NORMALIZE_VEC4 aligned groups of four elements of
// the bound chunk, NORMALIZE_WG groups apart (so a workgroup's loads are
// contiguous), each from its group's statistics at scratch[group] and its
// affine index. Any [P, A, G, B] view works; when B is a multiple of four,
// the four elements share one statistics group and load and store as one
// vector. A partial group of four at the chunk's end is written as pairs,
// so packed f16/bf16 words are still written whole by one invocation.

// (p, g, b) of a flat element index.
fn position(global: u32) -> vec3<u32> {
    let ab = fast_div(global, params.div_b);
    let b = global - ab * params.b;
    let pa = fast_div(ab, params.div_g);
    let g = ab - pa * params.g;
    let p = fast_div(global, params.div_agb);
    return vec3<u32>(p, g, b);
}

fn normalized_at(i: u32) -> f32 {
    let pos = position(params.chunk_base + i);
    return normalize_value(load_x(i), scratch[pos.x * params.g + pos.y], pos.y, pos.z);
}

@compute @workgroup_size(NORMALIZE_WG)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let vector_b = params.b % 4u == 0u;
    for (var k = 0u; k < NORMALIZE_VEC4; k++) {
        let t = (linear_workgroup(wid, nwg) * NORMALIZE_VEC4 + k) * NORMALIZE_WG + lid;
        let first = 4u * t;
        if (first >= params.chunk_len) {
            return;
        }
        if (first + 4u <= params.chunk_len) {
            var y: vec4<f32>;
            if (vector_b) {
                let pos = position(params.chunk_base + first);
                let st = scratch[pos.x * params.g + pos.y];
                y = affine4(((load_x4(t) - st.x) - st.y) * st.z, pos.y, pos.z);
            } else {
                y = vec4<f32>(
                    normalized_at(first),
                    normalized_at(first + 1u),
                    normalized_at(first + 2u),
                    normalized_at(first + 3u),
                );
            }
            store_y4(t, y);
        } else {
            for (var i = first; i < params.chunk_len; i += 2u) {
                let second = i + 1u < params.chunk_len;
                var v1 = 0.0;
                if (second) {
                    v1 = normalized_at(i + 1u);
                }
                store_y2(i, normalized_at(i), v1, second);
            }
        }
    }
}
