// Partials pass of the statistics engine.
//
// One workgroup reduces one tile of one group: up to STATS_WG·STATS_PER_THREAD
// consecutive elements j of the group (p, g), shifted by the group's first
// element (zero for RMS). Each invocation sums its values and their squares
// (see shifted_summary), and the workgroup merges the invocations' summaries
// with Chan's formula. Output: vec4(count, mean, M2, 0) at
// scratch[partials_offset + group·merge_tiles + chunk_index·tiles + tile]
// (one chunk unless the tensor is larger than a binding; a tile with no
// element of the chunk writes zeros).
//
// The workgroup with w == 0 also bumps num_batches_tracked when asked, so the
// finalize pass (the next dispatch) reads the already incremented counter.

var<workgroup> wg_sum: array<vec3<f32>, STATS_WG>;

// (mean, M2) of `count` values from their sum and sum of squares, all
// shifted by the group's shift (group_shift; zero for RMS, whose "M2" is Σx²).
// Few values per invocation (at most STATS_PER_THREAD or COLUMN_ROWS), all
// shifted, so the subtraction loses little; Chan's merge does the rest.
// Holding the values for an exact two-pass ran slower on lavapipe (the
// array stayed in memory). A NaN stays NaN (no max()).
fn shifted_summary(count: u32, sum: f32, sq: f32) -> vec2<f32> {
    if (count == 0u) {
        return vec2<f32>(0.0);
    }
    if (IS_RMS) {
        return vec2<f32>(0.0, sq);
    }
    let mean = sum / f32(count);
    var m2 = sq - sum * mean;
    if (m2 < 0.0) {
        m2 = 0.0;
    }
    return vec2<f32>(mean, m2);
}

fn bump_counter_once() {
    let lo = counter[0] + 1u;
    counter[0] = lo;
    if (lo == 0u) {
        counter[1] = counter[1] + 1u;
    }
}

@compute @workgroup_size(1)
fn bump_counter() {
    bump_counter_once();
}

@compute @workgroup_size(STATS_WG)
fn partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg);
    if (w >= params.n_groups * params.tiles) {
        return;
    }
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
        var sum = vec4<f32>(0.0);
        var sq = vec4<f32>(0.0);
        for (var k = 0u; k < STATS_PER_THREAD / 8u; k++) {
            let j = start + 8u * (lid + k * STATS_WG);
            if (j < end) {
                let v = load_x4((element_index(p, g, j) - params.chunk_base) >> 2u) - shift;
                sum += v;
                sq += v * v;
                count += 4u;
            }
            if (j + 4u < end) {
                let v = load_x4((element_index(p, g, j + 4u) - params.chunk_base) >> 2u) - shift;
                sum += v;
                sq += v * v;
                count += 4u;
            }
        }
        let summary = shifted_summary(count, hsum(sum), hsum(sq));
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
    wg_sum[lid] = vec3<f32>(f32(count), mean, m2);
    workgroupBarrier();
    for (var stride = STATS_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            wg_sum[lid] = chan_merge(wg_sum[lid], wg_sum[lid + stride]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let s = wg_sum[0];
        let slot = group * params.merge_tiles + params.chunk_index * params.tiles + tile;
        scratch[params.partials_offset + slot] = vec4<f32>(s, 0.0);
    }
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
// group are spread across every row. One invocation owns four adjacent
// columns (one vec4, so neighbouring invocations read neighbouring memory)
// over a block of COLUMN_ROWS rows, takes their shifted sums, and writes
// one partial per column: for column q (group
// g = q / B, b = q % B) at slot b·tiles + block of the group, where tiles is
// the number of row blocks. No barrier and no workgroup memory.
@compute @workgroup_size(STATS_WG)
fn partials_columns(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let inv = linear_workgroup(wid, nwg) * STATS_WG + lid;
    let l = params.g * params.b;
    let l4 = l / 4u;
    let per_p = params.tiles * l4;
    if (inv >= params.p * per_p) {
        return;
    }
    if (inv == 0u && has_flag(FLAG_BUMP_COUNTER)) {
        bump_counter_once();
    }
    let p = inv / per_p;
    let r = inv - p * per_p;
    let block = r / l4;
    let q4 = r - block * l4;
    let row0 = block * COLUMN_ROWS;
    let rows = min(COLUMN_ROWS, params.a - row0);
    var groups: vec4<u32>;
    var shift = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        groups[i] = (4u * q4 + i) / params.b;
        shift[i] = group_shift(p, groups[i]);
    }
    var sum = vec4<f32>(0.0);
    var sq = vec4<f32>(0.0);
    for (var i = 0u; i < rows; i++) {
        let v = load_x4((p * params.a + row0 + i) * l4 + q4) - shift;
        sum += v;
        sq += v * v;
    }
    var mean: vec4<f32>;
    var m2: vec4<f32>;
    for (var i = 0u; i < 4u; i++) {
        let summary = shifted_summary(rows, sum[i], sq[i]);
        mean[i] = summary.x;
        m2[i] = summary.y;
    }
    for (var i = 0u; i < 4u; i++) {
        let b = 4u * q4 + i - groups[i] * params.b;
        let slot = (p * params.g + groups[i]) * params.merge_tiles + b * params.tiles + block;
        scratch[params.partials_offset + slot] = vec4<f32>(f32(rows), mean[i], m2[i], 0.0);
    }
}
