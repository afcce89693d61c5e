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
        return affine4(((load_x4(t) - st.x) - st.y) * st.z, pos.y, pos.y * (params.b >> 2u) + (pos.z >> 2u));
    }
    if (params.b == 1u && params.g % 4u == 0u) {
        // Channels-last: four adjacent groups (channels), vector parameters.
        let global = params.chunk_base + first;
        let pa = fast_div(global, params.div_g);
        let g0 = global - pa * params.g;
        var p = 0u;
        if (params.p != 1u) {
            p = fast_div(global, params.div_agb);
        }
        let s = p * params.g + g0;
        let s0 = scratch[s];
        let s1 = scratch[s + 1u];
        let s2 = scratch[s + 2u];
        let s3 = scratch[s + 3u];
        let shift = vec4<f32>(s0.x, s1.x, s2.x, s3.x);
        let dmean = vec4<f32>(s0.y, s1.y, s2.y, s3.y);
        let rstd = vec4<f32>(s0.z, s1.z, s2.z, s3.z);
        return affine4(((load_x4(t) - shift) - dmean) * rstd, g0, g0 >> 2u);
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

// Run by run, for B a multiple of four and long enough to fill a workgroup
// (the host checks; the tensor is in one binding). Workgroup w covers block
// w % run_blocks of run w / run_blocks, the B contiguous elements of one
// (p, a, g): the statistics group and, when the affine index is the group,
// γ and β are the same for the whole workgroup, found once with a few
// uniform divisions instead of per element. Invocation lid handles the vec4
// pairs 2·lid, 2·lid + 2·RUNS_WG, ... of its block (run_vec4 vectors).
@compute @workgroup_size(RUNS_WG)
fn normalize_runs(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg);
    let run = w / params.run_blocks;
    if (run >= params.p * params.a * params.g) {
        return;
    }
    let block = w - run * params.run_blocks;
    let pa = run / params.g;
    let g = run - pa * params.g;
    let p = pa / params.a;
    let st = scratch[p * params.g + g];
    let n4 = params.b / 4u;
    let base4 = run * n4;
    // Invocations take two neighbouring vectors per step (run_vec4 is
    // even): CPUs that run WGSL stream 32-byte pieces much faster than
    // 16-byte ones (lavapipe).
    let first = block * params.run_vec4 * RUNS_WG + 2u * lid;
    if (AFFINE_MODE == AFFINE_PER_RUN) {
        // One γ and β per run (BatchNorm, InstanceNorm).
        let so = run_scale_offset(st, g);
        let centre = so.x;
        let scale = so.y;
        let offset = so.z;
        for (var k = 0u; k < params.run_vec4; k += 2u) {
            let j4 = first + k * RUNS_WG;
            if (j4 < n4) {
                store_y4(base4 + j4, (load_x4(base4 + j4) - centre) * scale + offset);
            }
            if (j4 + 1u < n4) {
                store_y4(base4 + j4 + 1u, (load_x4(base4 + j4 + 1u) - centre) * scale + offset);
            }
        }
    } else {
        for (var k = 0u; k < params.run_vec4; k += 2u) {
            for (var h = 0u; h < 2u; h++) {
                let j4 = first + k * RUNS_WG + h;
                if (j4 < n4) {
                    let xn = ((load_x4(base4 + j4) - st.x) - st.y) * st.z;
                    store_y4(base4 + j4, affine4(xn, g, g * n4 + j4));
                }
            }
        }
    }
}

// Short runs (channels-last): each p is A rows of L = G·B columns, with L/4
// dividing NORMALIZE_WG (the host checks). Workgroup w covers block
// w % run_blocks of the rows of p = w / run_blocks. Invocation lid always
// owns the same strip of two vectors (eight columns; the last strip of an
// odd count repeats its one vector), strip lid % S of the S per row, so it
// loads their statistics (of p) and γ, β once and folds them into
// y = (x − shift)·scale + offset; the loop over its rows (lid / S, then
// every NORMALIZE_WG/S rows, run_vec4 times from the block's first row) is
// loads, one multiply-add and stores of 32 contiguous bytes per row (CPUs
// that run WGSL stream such pieces much faster than 16-byte ones).
@compute @workgroup_size(NORMALIZE_WG)
fn normalize_columns(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg);
    let p = w / params.run_blocks;
    if (p >= params.p) {
        return;
    }
    let block = w - p * params.run_blocks;
    let l4 = (params.g * params.b) / 4u;
    let strips = (l4 + 1u) / 2u;
    let v0 = 2u * (lid % strips);
    let v1 = min(v0 + 1u, l4 - 1u);
    let k0 = column_affine(p, v0);
    let k1 = column_affine(p, v1);
    let rows_per_step = NORMALIZE_WG / strips;
    let first_row = block * params.run_vec4 * rows_per_step + lid / strips;
    let rows = params.a;
    for (var k = 0u; k < params.run_vec4; k++) {
        let row = first_row + k * rows_per_step;
        if (row < rows) {
            let t = (p * rows + row) * l4;
            store_y4(t + v0, (load_x4(t + v0) - k0[0]) * k0[1] + k0[2]);
            if (v1 != v0) {
                store_y4(t + v1, (load_x4(t + v1) - k1[0]) * k1[1] + k1[2]);
            }
        }
    }
}
