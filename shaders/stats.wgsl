// Partials pass of the statistics engine.
//
// One workgroup reduces one tile of one group: up to STATS_WG·STATS_PER_THREAD
// consecutive elements j of the group (p, g), shifted by the group's shift
// (group_shift; zero for RMS). Each invocation sums its values and their
// squares (invocation_summary). `partials` merges the invocations' summaries
// with Chan's formula and writes vec4(count, mean, M2, 0) at
// scratch[partials_offset + group·merge_tiles + slot·tiles + tile], slot
// being the bound chunk's among the group's (chunk_slot: one chunk unless
// the tensor is larger than a binding; a chunk the group does not reach
// skips it, so that small groups of a split tensor keep about two
// partials, not one per chunk; a slot without elements reads zero, written
// by a tile with none, or cleared before the pass where src/engine.rs
// chunk_groups leaves the group out of the chunk's dispatch);
// `partials_each` writes every
// invocation's summary instead (tensors in one binding with mostly full
// tiles, src/engine.rs).
//
// The workgroup with w == 0 also bumps num_batches_tracked when asked, so the
// finalize pass (the next dispatch) reads the already incremented counter.

var<workgroup> wg_sum: array<vec3<f32>, STATS_WG>;

@compute @workgroup_size(1)
fn bump_counter() {
    bump_counter_once();
}

// Training on an empty batch where the framework still averages the batch
// into the running statistics (torch's tracked InstanceNorm, Keras's
// BatchNormalization): the mean of no values is NaN, and so are they. One
// invocation per channel (G); the NaN's bits come from a variable, since a
// constant expression may not be NaN in WGSL.
@compute @workgroup_size(STATS_WG)
fn running_nan(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_workgroup(wid, nwg) * STATS_WG + lid;
    var nan_bits = 0x7fc00000u;
    if (c < params.g) {
        running_mean[c] = bitcast<f32>(nan_bits);
        running_var[c] = bitcast<f32>(nan_bits);
    }
}

@compute @workgroup_size(STATS_WG)
fn partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg) + params.group_offset * params.tiles;
    if (w >= params.n_groups * params.tiles) {
        return;
    }
    // Uniform per workgroup (one group each). The group of w = 0 always
    // reaches chunk 0, so the counter bump below still runs once.
    let group = w / params.tiles;
    let slot = chunk_slot(group / params.g, group % params.g);
    if (slot >= params.chunk_span) {
        return;
    }
    wg_sum[lid] = invocation_summary(w, lid);
    workgroupBarrier();
    for (var stride = STATS_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            wg_sum[lid] = chan_merge(wg_sum[lid], wg_sum[lid + stride]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let tile = w % params.tiles;
        let at = group * params.merge_tiles + slot * params.tiles + tile;
        scratch[params.partials_offset + at] = vec4<f32>(wg_sum[0], 0.0);
    }
}

// `partials` without the workgroup merge: every invocation writes its own
// summary, STATS_WG partials per tile (at slot tile·STATS_WG + lid of the
// group; one chunk only), merged by the finalize pass. The merge tree's
// barriers were a sixth of BatchNorm's train forward on lavapipe, and the
// partials stay small (STATS_WG vec4 per 4096 elements). A separate entry
// point rather than a flag: in the backward, one kernel switching between
// a serial path (invocations returning early) and a barrier tree gave
// wrong sums on lavapipe.
@compute @workgroup_size(STATS_WG)
fn partials_each(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg);
    if (w >= params.n_groups * params.tiles) {
        return;
    }
    let group = w / params.tiles;
    let tile = w % params.tiles;
    let slot = group * params.merge_tiles + tile * STATS_WG + lid;
    scratch[params.partials_offset + slot] = vec4<f32>(invocation_summary(w, lid), 0.0);
}

// (count, mean, M2) of invocation lid's elements of tile w (see the
// header). Workgroup 0's invocation 0 also bumps num_batches_tracked when
// asked.
fn invocation_summary(w: u32, lid: u32) -> vec3<f32> {
    if (w == 0u && lid == 0u && params.chunk_index == 0u && has_flag(FLAG_BUMP_COUNTER)) {
        bump_counter_once();
    }
    let group = w / params.tiles;
    let tile = w % params.tiles;
    let p = group / params.g;
    let g = group % params.g;
    let lo = first_j(p, g, params.chunk_base);
    let hi = first_j(p, g, params.chunk_base + params.chunk_len);
    let start = lo + tile * params.tile_len;
    let end = min(start + params.tile_len, hi);
    let shift = group_shift(p, g);

    var count = 0u;
    var mean = 0.0;
    var m2 = 0.0;
    if (params.b % 4u == 0u) {
        // Aligned groups of four share a run of the group: one vector load
        // each (tile starts, ends and chunk bounds are multiples of four).
        // Each invocation reads two neighbouring vectors per step: CPUs that
        // run WGSL stream 32-byte pieces much faster than 16-byte ones
        // (lavapipe; as the backward's partials).
        // The position moves by whole strides without a division
        // (run_step).
        var sums = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
        let stride = run_pos(8u * STATS_WG, params.div_b);
        let pair = run_pos(4u, params.div_b);
        var pos = run_pos(start + 8u * lid, params.div_b);
        for (var k = 0u; k < STATS_PER_THREAD / 8u; k++) {
            let j = start + 8u * (lid + k * STATS_WG);
            let next = run_step(pos, pair, params.b);
            if (j < end) {
                sums += shifted_terms4(element_index_at(p, g, pos), shift);
                count += 4u;
            }
            if (j + 4u < end) {
                sums += shifted_terms4(element_index_at(p, g, next), shift);
                count += 4u;
            }
            pos = run_step(pos, stride, params.b);
        }
        let summary = shifted_summary(count, hsum(sums[0]), hsum(sums[1]));
        mean = summary.x;
        m2 = summary.y;
    } else {
        var sum = 0.0;
        var sq = 0.0;
        for (var k = 0u; k < STATS_PER_THREAD; k++) {
            let j = start + lid + k * STATS_WG;
            if (j < end) {
                let v = load_x(element_index(p, g, j) - params.chunk_base) - shift;
                sum += v;
                sq += v * v;
                count++;
            }
        }
        let summary = shifted_summary(count, sum, sq);
        mean = summary.x;
        m2 = summary.y;
    }
    return vec3<f32>(f32(count), mean, m2);
}

// Chunked tensors only: one invocation per group copies the group's first
// element into scratch[group].x when it lies in the bound chunk (the
// median-of-three shift of group_shift would need elements of other chunks;
// the first element is the shift of the chunked path).
@compute @workgroup_size(FINALIZE_WG)
fn shifts(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = linear_workgroup(wid, nwg) * FINALIZE_WG + lid;
    if (group >= params.n_groups) {
        return;
    }
    let first = element_index(group / params.g, group % params.g, 0u);
    if (first >= params.chunk_base && first < params.chunk_base + params.chunk_len) {
        var shift = 0.0;
        if (!IS_RMS) {
            shift = load_x(first - params.chunk_base);
        }
        scratch[group] = vec4<f32>(shift, 0.0, 0.0, 0.0);
    }
}

// Partials of views with short runs (B < 4, e.g. channels-last BatchNorm,
// B = 1): the tensor is P·A rows of L = G·B columns, and the elements of a
// group are spread across every row. One invocation owns a strip of two
// adjacent vec4 (eight columns; the last strip of an odd count repeats its
// one vector) over a block of tile_len rows, takes their shifted sums,
// centred on their mean over the block's first COLUMN_PREFIX rows
// (column_prefix), and writes one partial per column: for column q
// (group g = q / B, b = q % B) at slot b·tiles + block of the group, where
// tiles is the
// number of row blocks. Neighbouring invocations read neighbouring strips,
// each 32 contiguous bytes of a row (CPUs that run WGSL stream such pieces
// much faster than 16-byte ones). No barrier and no workgroup memory.
@compute @workgroup_size(STATS_WG)
fn partials_columns(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let inv = linear_workgroup(wid, nwg) * STATS_WG + lid;
    let l4 = (params.g * params.b) / 4u;
    let strips = (l4 + 1u) / 2u;
    let per_p = params.tiles * strips;
    if (inv >= params.p * per_p) {
        return;
    }
    if (inv == 0u && has_flag(FLAG_BUMP_COUNTER)) {
        bump_counter_once();
    }
    let p = inv / per_p;
    let r = inv - p * per_p;
    let block = r / strips;
    let v0 = 2u * (r - block * strips);
    let v1 = min(v0 + 1u, l4 - 1u);
    let row0 = block * params.tile_len;
    let rows = min(params.tile_len, params.a - row0);
    let shift0 = column_shifts(p, v0);
    let shift1 = column_shifts(p, v1);
    let centre0 = column_prefix(p, row0, rows, v0, shift0);
    let centre1 = column_prefix(p, row0, rows, v1, shift1);
    var sum0 = Compensated4();
    var sq0 = Compensated4();
    var sum1 = Compensated4();
    var sq1 = Compensated4();
    for (var i0 = 0u; i0 < rows; i0 += COMPENSATED_BLOCK) {
        var block_sum0 = vec4<f32>(0.0);
        var block_sq0 = vec4<f32>(0.0);
        var block_sum1 = vec4<f32>(0.0);
        var block_sq1 = vec4<f32>(0.0);
        for (var i = i0; i < min(rows, i0 + COMPENSATED_BLOCK); i++) {
            let row4 = (p * params.a + row0 + i) * l4;
            let a = (load_x4(row4 + v0) - shift0) - centre0;
            block_sum0 += a;
            block_sq0 += a * a;
            let c = (load_x4(row4 + v1) - shift1) - centre1;
            block_sum1 += c;
            block_sq1 += c * c;
        }
        sum0 = add_compensated4(sum0, block_sum0);
        sq0 = add_compensated4(sq0, block_sq0);
        sum1 = add_compensated4(sum1, block_sum1);
        sq1 = add_compensated4(sq1, block_sq1);
    }
    write_column_partials(p, block, v0, rows, centre0, compensated_total4(sum0), compensated_total4(sq0));
    if (v1 != v0) {
        write_column_partials(p, block, v1, rows, centre1, compensated_total4(sum1), compensated_total4(sq1));
    }
}
