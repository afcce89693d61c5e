// Backward kernels (SPEC.md §4). Declarations and helpers are in
// backward_common.wgsl; src/backward.rs plans which of these run.
//
// No float atomics: every sum is a two-stage reduction. A first stage writes
// partials (vec4 (Σg, Σg·x̂, Σdy, Σdy·x̂)) to `work`, and `bwd_finalize`
// (a workgroup per output) or `bwd_finalize_serial` (an invocation per
// output) merges them. Each invocation of a
// reduction writes a slot no other invocation writes, and every slot a later
// dispatch reads is written by an earlier one.

var<workgroup> wg_vec: array<vec4<f32>, BWD_WG>;

// Sum of v over the first `size` invocations (size a power of two ≤ BWD_WG).
// Called in uniform control flow by every invocation of the workgroup.
fn workgroup_sum4(lid: u32, v: vec4<f32>, size: u32) -> vec4<f32> {
    wg_vec[lid] = v;
    workgroupBarrier();
    for (var stride = size / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            wg_vec[lid] = wg_vec[lid] + wg_vec[lid + stride];
        }
        workgroupBarrier();
    }
    let total = wg_vec[0];
    workgroupBarrier();
    return total;
}

// Flat index of element j of reduction group (p, g).
fn reduction_index(p: u32, g: u32, j: u32) -> u32 {
    return reduction_index_at(p, g, run_pos(j, bp.div_rb));
}

// reduction_index of the element at `pos` (runs of RB).
fn reduction_index_at(p: u32, g: u32, pos: RunPos) -> u32 {
    return ((p * bp.ra + pos.run) * bp.rg + g) * bp.rb + pos.off;
}

// (dy, dy·x̂) of the four elements at vector i4, with statistics st.
fn dy_terms4(i4: u32, st: vec4<f32>) -> mat2x4<f32> {
    let d = load_dy4(i4);
    return dy_terms_of(d, load_x4(i4), st);
}

// dy_terms4 of the values d and x of grad_output and x.
fn dy_terms_of(d: vec4<f32>, x: vec4<f32>, st: vec4<f32>) -> mat2x4<f32> {
    return mat2x4<f32>(d, d * (((x - st.x) - st.y) * st.z));
}

// One workgroup per contiguous group of the stats view (SA = 1): sums the
// group's terms, writes grad_input of the group, and with
// BF_WRITE_PARTIALS stores each channel's sums as its partial (one channel
// per group for InstanceNorm, several for GroupNorm; for the per-channel
// affine gradients of bwd_finalize). Each invocation handles
// BWD_PACK consecutive elements at a time; with packed storage (BWD_PACK =
// 2) src/backward.rs uses this kernel only for groups of even length, so a
// group starts at an even index and no word is shared with another
// workgroup.
@compute @workgroup_size(BWD_WG)
fn bwd_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = bwd_linear_workgroup(wid, nwg);
    if (group >= bp.sp * bp.sg) {
        return;
    }
    let n = bp.sb;
    let base = group * n;
    // The group is one run: its statistics are known once, and so is its
    // first affine index.
    let st = stats[group];
    let c0 = affine_index(base);
    if (BWD_VEC4) {
        // Whole vectors: the group starts at a multiple of four. It is
        // summed channel by channel (group_channel_len4), each channel's
        // sums written as its partial with BF_WRITE_PARTIALS.
        let n4 = n / 4u;
        let base4 = base / 4u;
        let d4 = group_channel_len4(n4);
        let channels = n4 / d4;
        var s4 = vec4<f32>(0.0);
        for (var ch = 0u; ch < channels; ch++) {
            var acc4 = vec4<f32>(0.0);
            for (var j4 = ch * d4 + lid; j4 < (ch + 1u) * d4; j4 += BWD_WG) {
                acc4 += terms4(base4 + j4, st, group_weight4(base, c0, ch, j4));
            }
            let sc = workgroup_sum4(lid, acc4, BWD_WG);
            if (lid == 0u && bwd_flag(BF_WRITE_PARTIALS)) {
                work[bp.partials_offset + group * channels + ch] = sc;
            }
            s4 += sc;
        }
        for (var ch = 0u; ch < channels; ch++) {
            for (var j4 = ch * d4 + lid; j4 < (ch + 1u) * d4; j4 += BWD_WG) {
                store_dx4(base4 + j4, grad_input4(base4 + j4, s4, st, group_weight4(base, c0, ch, j4)));
            }
        }
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var j = lid * BWD_PACK; j < n; j += BWD_WG * BWD_PACK) {
        acc += terms_with(base + j, st, run_affine_index(base, c0, j));
        if (BWD_PACK == 2u && j + 1u < n) {
            acc += terms_with(base + j + 1u, st, run_affine_index(base, c0, j + 1u));
        }
    }
    let s = workgroup_sum4(lid, acc, BWD_WG);
    if (lid == 0u && bwd_flag(BF_WRITE_PARTIALS)) {
        work[bp.partials_offset + group] = s;
    }
    for (var j = lid * BWD_PACK; j < n; j += BWD_WG * BWD_PACK) {
        let second = BWD_PACK == 2u && j + 1u < n;
        var v1 = 0.0;
        if (second) {
            v1 = grad_input_with(base + j + 1u, s, st, run_affine_index(base, c0, j + 1u));
        }
        store_dx(base + j, grad_input_with(base + j, s, st, run_affine_index(base, c0, j)), v1, second);
    }
}

// Invocation lid's sums (Σg, Σg·x̂, Σdy, Σdy·x̂) over the elements
// [start, end) of group (p, g) of a reduction view that is the stats view
// itself, with one parameter per run and runs of whole vectors
// (BatchNorm): the statistics and γ are the group's, read once, and with
// one γ, Σg = γ·Σdy, so only Σdy and Σdy·x̂ are summed.
fn channel_run_sums(p: u32, g: u32, group: u32, start: u32, end: u32, lid: u32) -> vec4<f32> {
    let st = stats[group];
    // Sums lane-wise, reduced once at the end. Each invocation reads two
    // neighbouring vectors (32 bytes) at a time: CPUs that run WGSL stream
    // such pieces faster (see bwd_cols). Tiles are multiples of eight
    // elements and the group ends at a multiple of four, so each vector is
    // whole or past the end.
    // The position moves by whole strides without a division (run_step).
    var sums = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
    let stride = run_pos(8u * BWD_WG, bp.div_rb);
    let pair = run_pos(4u, bp.div_rb);
    var pos = run_pos(start + 8u * lid, bp.div_rb);
    for (var k = 0u; k < BWD_PER_THREAD / 8u; k++) {
        let j = start + 8u * (lid + k * BWD_WG);
        let next = run_step(pos, pair, bp.rb);
        if (j < end) {
            sums += dy_terms4(reduction_index_at(p, g, pos) / 4u, st);
        }
        if (j + 4u < end) {
            sums += dy_terms4(reduction_index_at(p, g, next) / 4u, st);
        }
        pos = run_step(pos, stride, bp.rb);
    }
    return sums_with_weight(hsum(sums[0]), hsum(sums[1]), weight_of_group(g));
}

// The tile of partials workgroup w: its reduction group (p, g) and the
// group's elements [start, end) it sums.
struct PartialsTile {
    group: u32,
    tile: u32,
    p: u32,
    g: u32,
    start: u32,
    end: u32,
}

fn partials_tile(w: u32) -> PartialsTile {
    let group = w / bp.tiles;
    let tile = w % bp.tiles;
    let start = tile * bp.tile_len;
    return PartialsTile(group, tile, group / bp.rg, group % bp.rg, start, min(start + bp.tile_len, bp.ra * bp.rb));
}

// bwd_partials without the workgroup tree, for the groups of
// channel_run_sums (BatchNorm channels-first): every invocation writes its
// own sums, at slot (tile·BWD_WG + lid)·tile_stride of its group, and the
// finalize pass merges them. The tree's barriers were about a quarter of
// lavapipe's partials pass (it pays about 2 µs per workgroup and barrier
// level). A separate entry point, not a flag: one kernel that switched
// between early-returning invocations and a barrier tree gave wrong sums
// on lavapipe.
@compute @workgroup_size(BWD_WG)
fn bwd_partials_each(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = bwd_linear_workgroup(wid, nwg);
    if (w >= bp.n_groups * bp.tiles) {
        return;
    }
    let t = partials_tile(w);
    let s = channel_run_sums(t.p, t.g, t.group, t.start, t.end, lid);
    work[bp.partials_offset + t.group * bp.group_stride + (t.tile * BWD_WG + lid) * bp.tile_stride] = s;
}

// One workgroup per tile of up to BWD_WG·BWD_PER_THREAD consecutive
// elements of one reduction group: writes the tile's partial sums.
@compute @workgroup_size(BWD_WG)
fn bwd_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = bwd_linear_workgroup(wid, nwg) + bp.group_offset * bp.tiles;
    if (w >= bp.n_groups * bp.tiles) {
        return;
    }
    let t = partials_tile(w);
    // A split tensor: the bound chunk's slot among the group's, none for a
    // chunk the group does not reach (uniform per workgroup: one tile each).
    var slot = 0u;
    if (BWD_CHUNKED) {
        slot = bwd_chunk_slot(t.p, t.g);
        if (slot >= bp.chunk_span) {
            return;
        }
    }
    var acc = vec4<f32>(0.0);
    if (BWD_AFFINE == 1u && bp.rp == bp.sp && bp.ra == bp.sa && bp.rg == bp.sg && bp.rb == bp.sb) {
        // The group sums of the stats view itself with one parameter per
        // run (BatchNorm): the statistics and γ of the whole tile are
        // the group's, read once.
        if (BWD_VEC4) {
            acc = channel_run_sums(t.p, t.g, t.group, t.start, t.end, lid);
        } else {
            let st = stats[t.group];
            // Up to BWD_PER_THREAD steps: a short group's tile stops early.
            for (var j = t.start + lid; j < t.end; j += BWD_WG) {
                let i = reduction_index(t.p, t.g, j);
                if (in_chunk(i)) {
                    acc += terms_with(i, st, t.g);
                }
            }
        }
    } else if (BWD_VEC4 && bp.rb % 4u == 0u) {
        // Any reduction view whose runs are whole vectors (the [1, R, K, D]
        // view of channels-first GroupNorm's affine gradients): four
        // aligned elements share their statistics group and are loaded
        // together, two vectors per step (32-byte pieces, as above).
        for (var k = 0u; k < BWD_PER_THREAD / 8u; k++) {
            let j = t.start + 8u * (lid + k * BWD_WG);
            if (j < t.end) {
                let i = reduction_index(t.p, t.g, j);
                acc += terms4(i / 4u, stats[stats_group(i)], weight4_of(i));
            }
            if (j + 4u < t.end) {
                let i = reduction_index(t.p, t.g, j + 4u);
                acc += terms4(i / 4u, stats[stats_group(i)], weight4_of(i));
            }
        }
    } else {
        for (var j = t.start + lid; j < t.end; j += BWD_WG) {
            let i = reduction_index(t.p, t.g, j);
            if (in_chunk(i)) {
                acc += element_terms(i);
            }
        }
    }
    let s = workgroup_sum4(lid, acc, BWD_WG);
    if (lid == 0u) {
        let tile = slot * bp.tiles + t.tile;
        work[bp.partials_offset + t.group * bp.group_stride + tile * bp.tile_stride] = s;
    }
}

// Merges partials. Without BF_LOOP_P one output per reduction group; with
// it one output per index w < RG summing over p < RP (the affine gradients
// of index w sum every p). BF_WRITE_GSUM stores each group's sums at
// work[group] (the host sets it only where an output merges one group);
// BF_GRAD_WEIGHT/BF_GRAD_BIAS write Σdy·x̂ and Σdy of w. A workgroup per
// output: each invocation sums its share of the output's partials (all
// groups' tiles in one flat range, so that it loops RP·tiles/64 times),
// then one tree adds the invocations' sums. lavapipe runs at most 65,535
// loop iterations per invocation and silently stops after them: a tree
// per group, RP of them in a loop, lost every group past 6,554
// (InstanceNorm's affine gradients over a batch of 6,555), and a loop
// over groups around one over tiles every group past 21,845.
// bwd_finalize_serial (BF_SERIAL) merges few partials per output in one
// invocation.
@compute @workgroup_size(BWD_FINALIZE_WG)
fn bwd_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = bwd_linear_workgroup(wid, nwg);
    let n_loop = finalize_loops(w);
    var acc = vec4<f32>(0.0);
    for (var k = lid; k < n_loop * bp.tiles; k += BWD_FINALIZE_WG) {
        let i = k / bp.tiles;
        let t = k - i * bp.tiles;
        acc += work[bp.partials_offset + finalize_group(i, w) * bp.group_stride + t * bp.tile_stride];
    }
    let total = workgroup_sum4(lid, acc, BWD_FINALIZE_WG);
    if (lid == 0u && n_loop > 0u) {
        if (bwd_flag(BF_WRITE_GSUM)) {
            work[finalize_group(0u, w)] = total;
        }
        finalize_gradients(w, total);
    }
}

// bwd_finalize with one invocation per output, merging its partials in
// order: no barrier. The host picks it when outputs have few partials
// (src/backward.rs, FINALIZE_SERIAL_MAX); lavapipe paid about 10 µs of
// barriers per workgroup of the tree version.
@compute @workgroup_size(BWD_FINALIZE_WG)
fn bwd_finalize_serial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = bwd_linear_workgroup(wid, nwg) * BWD_FINALIZE_WG + lid;
    let n_loop = finalize_loops(w);
    var total = vec4<f32>(0.0);
    for (var i = 0u; i < n_loop; i++) {
        let group = finalize_group(i, w);
        let first = bp.partials_offset + group * bp.group_stride;
        var s = vec4<f32>(0.0);
        for (var t = 0u; t < bp.tiles; t++) {
            s += work[first + t * bp.tile_stride];
        }
        if (bwd_flag(BF_WRITE_GSUM)) {
            work[group] = s;
        }
        total += s;
    }
    if (n_loop > 0u) {
        finalize_gradients(w, total);
    }
}

// Reduction groups finalize output w merges: RP with BF_LOOP_P, else one;
// none past the last output.
fn finalize_loops(w: u32) -> u32 {
    if (bwd_flag(BF_LOOP_P)) {
        return select(0u, bp.rp, w < bp.rg);
    }
    return select(0u, 1u, w < bp.n_groups);
}

// The i-th reduction group of finalize output w.
fn finalize_group(i: u32, w: u32) -> u32 {
    if (bwd_flag(BF_LOOP_P)) {
        return i * bp.rg + w;
    }
    return w;
}

fn finalize_gradients(w: u32, total: vec4<f32>) {
    store_affine_grads(w, total.w, total.z);
}

// Writes dγ and dβ of affine index i (those asked for), or with
// BF_ACCUMULATE adds them to what the chunks before wrote: a tensor split
// into chunks of whole blocks runs a backward per chunk, and its parameter
// gradients are the sums over them.
fn store_affine_grads(i: u32, dw: f32, db: f32) {
    if (bwd_flag(BF_GRAD_WEIGHT)) {
        var w = dw;
        if (bwd_flag(BF_ACCUMULATE)) {
            w += grad_weight[i];
        }
        grad_weight[i] = w;
    }
    if (bwd_flag(BF_GRAD_BIAS)) {
        var b = db;
        if (bwd_flag(BF_ACCUMULATE)) {
            b += grad_bias[i];
        }
        grad_bias[i] = b;
    }
}

// The affine gradients of an empty input (bp.cols of them): sums over no
// element, 0, and NaN for dγ with BF_NAN_WEIGHT_GRAD. The caller's buffers
// need not be zeroed, so even an empty input writes them.
@compute @workgroup_size(BWD_WG)
fn bwd_empty_affine_grads(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = bwd_linear_workgroup(wid, nwg) * BWD_WG + lid;
    if (i >= bp.cols) {
        return;
    }
    var dw = 0.0;
    if (bwd_flag(BF_NAN_WEIGHT_GRAD)) {
        dw = bitcast<f32>(0x7fc00000u);
    }
    store_affine_grads(i, dw, 0.0);
}

// Elementwise grad_input: BWD_DX_PER_THREAD consecutive elements per
// invocation (an aligned run: it starts at a multiple of
// BWD_DX_PER_THREAD, so with packed storage every word belongs to one
// invocation), BWD_PACK per store, from the group sums at
// work[stats group] (not read in eval mode, BF_RUNNING, where
// dx = g·rstd).
@compute @workgroup_size(BWD_WG)
fn bwd_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let running = BWD_RUNNING;
    if (BWD_VEC4 && BWD_AFFINE == 1u) {
        dx_runs(bwd_linear_workgroup(wid, nwg), lid);
        return;
    }
    let first = (bwd_linear_workgroup(wid, nwg) * BWD_WG + lid) * BWD_DX_PER_THREAD;
    if (BWD_VEC4) {
        // Runs are whole vectors (BWD_DX_PER_THREAD = 4): the invocation's
        // four elements share one statistics group, found and read once.
        if (first >= bp.total) {
            return;
        }
        let group = stats_group(first);
        var s = vec4<f32>(0.0);
        if (!running) {
            s = work[group];
        }
        store_dx4(first / 4u, grad_input4(first / 4u, s, stats[group], weight4_of(first)));
        return;
    }
    // The bound chunk's elements (the whole tensor unless BWD_CHUNKED).
    let end = bp.chunk_base + bp.chunk_len;
    for (var k = 0u; k < BWD_DX_PER_THREAD; k += BWD_PACK) {
        let i = bp.chunk_base + first + k;
        if (i >= end) {
            return;
        }
        var s = vec4<f32>(0.0);
        if (!running) {
            s = work[stats_group(i)];
        }
        let v0 = grad_input_value(i, s);
        // The pair's second element may be in the next stats group.
        let second = BWD_PACK == 2u && i + 1u < end;
        var v1 = 0.0;
        if (second) {
            var s1 = vec4<f32>(0.0);
            if (!running) {
                s1 = work[stats_group(i + 1u)];
            }
            v1 = grad_input_value(i + 1u, s1);
        }
        store_dx(i, v0, v1, second);
    }
}

// bwd_dx for runs of whole vectors with one γ per run (BatchNorm,
// InstanceNorm): workgroup w writes block w % tiles of run w / tiles, up to
// BWD_WG·BWD_DX_RUN_VEC4 vectors, neighbouring invocations on neighbouring
// vectors. The run's statistics group, sums and γ are found once and
// folded into grad_input = a·dy + b·(x − shift) + c (dx_coefficients), so
// per element the kernel only reads x and dy and writes dx.
fn dx_runs(w: u32, lid: u32) {
    let run = w / bp.tiles;
    let block = w - run * bp.tiles;
    if (run >= bp.total / bp.sb) {
        return;
    }
    let base = run * bp.sb;
    let group = stats_group(base);
    var s = vec4<f32>(0.0);
    if (!BWD_RUNNING) {
        s = work[group];
    }
    let k = dx_coefficients(stats[group], s, weight_of_group(affine_index(base)));
    let a = vec4<f32>(k.x);
    let b = vec4<f32>(k.y);
    let c = vec4<f32>(k.z);
    let shift = vec4<f32>(k.w);
    let n4 = bp.sb / 4u;
    let base4 = run * n4;
    // Two neighbouring vectors at a time (32 bytes; see bwd_partials).
    for (var q = 0u; q < BWD_DX_RUN_VEC4; q += 2u) {
        let j4 = (block * BWD_DX_RUN_VEC4 + q) * BWD_WG + 2u * lid;
        if (j4 < n4) {
            store_dx4(base4 + j4, dx_from(base4 + j4, a, b, c, shift));
        }
        if (j4 + 1u < n4) {
            store_dx4(base4 + j4 + 1u, dx_from(base4 + j4 + 1u, a, b, c, shift));
        }
    }
}

// Column sums for an affine index per column (affine_div = 1): the tensor
// is R rows of L = SG·SB columns. One invocation owns one column of a block
// of rows_per_block rows (consecutive invocations read consecutive
// addresses). With one row block (tiles = 1) it writes the gradients
// directly; otherwise the partial of (column l, block) goes to
// work[partials_offset + l·group_stride + block·tile_stride].
@compute @workgroup_size(BWD_WG)
fn bwd_cols(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = bwd_linear_workgroup(wid, nwg);
    if (BWD_VEC4) {
        if (bp.sb % 8u == 0u) {
            cols8(w, lid);
        } else {
            cols4(w, lid);
        }
        return;
    }
    let col_blocks = (bp.cols + BWD_WG - 1u) / BWD_WG;
    let block = w / col_blocks;
    let l = (w % col_blocks) * BWD_WG + lid;
    let r0 = block * bp.rows_per_block;
    if (block >= bp.tiles || l >= bp.cols) {
        return;
    }
    let r1 = min(r0 + bp.rows_per_block, bp.rows);
    // stats_group(i) for i = r·L + l is (i / (SA·SG·SB))·SG + l / SB: the
    // second term is the column's, known once.
    let col_group = fast_div(l, bp.div_sb);
    var acc = vec2<f32>(0.0);
    for (var r = r0; r < r1; r++) {
        let i = r * bp.cols + l;
        let st = stats[fast_div(i, bp.div_sagsb) * bp.sg + col_group];
        let xhat = ((load_x(i) - st.x) - st.y) * st.z;
        let d = load_dy(i);
        acc += vec2<f32>(d, d * xhat);
    }
    write_column(l, block, vec4<f32>(0.0, 0.0, acc.x, acc.y));
}

// bwd_cols with runs of whole vectors (BWD_VEC4): one invocation owns four
// consecutive columns (one statistics group) and reads them as vectors, so
// each row's statistics are read once per four columns.
fn cols4(w: u32, lid: u32) {
    let cols4 = bp.cols / 4u;
    let col_blocks = (cols4 + BWD_WG - 1u) / BWD_WG;
    let block = w / col_blocks;
    let l4 = (w % col_blocks) * BWD_WG + lid;
    let r0 = block * bp.rows_per_block;
    if (block >= bp.tiles || l4 >= cols4) {
        return;
    }
    let r1 = min(r0 + bp.rows_per_block, bp.rows);
    let l = 4u * l4;
    let col_group = fast_div(l, bp.div_sb);
    var sum_dy = vec4<f32>(0.0);
    var sum_dy_xhat = vec4<f32>(0.0);
    for (var r = r0; r < r1; r++) {
        let i4 = r * cols4 + l4;
        let st = stats[fast_div(4u * i4, bp.div_sagsb) * bp.sg + col_group];
        let xhat = ((load_x4(i4) - st.x) - st.y) * st.z;
        let d = load_dy4(i4);
        sum_dy += d;
        sum_dy_xhat += d * xhat;
    }
    for (var k = 0u; k < 4u; k++) {
        write_column(l + k, block, vec4<f32>(0.0, 0.0, sum_dy[k], sum_dy_xhat[k]));
    }
}

// cols4 with two vectors per invocation (runs of SB a multiple of eight, so
// both are in one statistics group): each invocation reads 32 contiguous
// bytes of every row instead of 16. CPUs that run WGSL stream rows much
// faster in the longer pieces: lavapipe's LayerNorm 4096x1024 column sums
// went from 14 to 6 ms (four vectors per invocation were no faster).
fn cols8(w: u32, lid: u32) {
    let cols8 = bp.cols / 8u;
    let col_blocks = (cols8 + BWD_WG - 1u) / BWD_WG;
    let block = w / col_blocks;
    let l8 = (w % col_blocks) * BWD_WG + lid;
    let r0 = block * bp.rows_per_block;
    if (block >= bp.tiles || l8 >= cols8) {
        return;
    }
    let r1 = min(r0 + bp.rows_per_block, bp.rows);
    let cols4 = 2u * cols8;
    let l = 8u * l8;
    let col_group = fast_div(l, bp.div_sb);
    var sum_dy = vec4<f32>(0.0);
    var sum_dy_xhat = vec4<f32>(0.0);
    var sum_dy_hi = vec4<f32>(0.0);
    var sum_dy_xhat_hi = vec4<f32>(0.0);
    for (var r = r0; r < r1; r++) {
        let i4 = r * cols4 + 2u * l8;
        let st = stats[fast_div(4u * i4, bp.div_sagsb) * bp.sg + col_group];
        let d = load_dy4(i4);
        let xhat = ((load_x4(i4) - st.x) - st.y) * st.z;
        sum_dy += d;
        sum_dy_xhat += d * xhat;
        let d_hi = load_dy4(i4 + 1u);
        let xhat_hi = ((load_x4(i4 + 1u) - st.x) - st.y) * st.z;
        sum_dy_hi += d_hi;
        sum_dy_xhat_hi += d_hi * xhat_hi;
    }
    for (var k = 0u; k < 4u; k++) {
        write_column(l + k, block, vec4<f32>(0.0, 0.0, sum_dy[k], sum_dy_xhat[k]));
        write_column(l + 4u + k, block, vec4<f32>(0.0, 0.0, sum_dy_hi[k], sum_dy_xhat_hi[k]));
    }
}

// Stores the sums s = (Σg, Σg·x̂, Σdy, Σdy·x̂) of column l over row block
// `block`: with one block the results themselves (the column's group sums
// with BF_WRITE_GSUM, and its gradients), else its partial.
fn write_column(l: u32, block: u32, s: vec4<f32>) {
    if (bp.tiles == 1u) {
        if (bwd_flag(BF_WRITE_GSUM)) {
            work[l] = s;
        }
        store_affine_grads(l, s.w, s.z);
    } else {
        work[bp.partials_offset + l * bp.group_stride + block * bp.tile_stride] = s;
    }
}

// dβ and dγ from the column sums bwd_rows_subgroup wrote with
// BWD_COLUMN_SUMS: invocation c4 adds up, over the `tiles` steps, Σdy and
// Σdy·x̂ of the four columns of vector c4 (column_sums_slot: neighbouring
// invocations read neighbouring vectors, and consecutive steps are
// contiguous), in blocks of 32 steps so that rounding grows with
// 32 + steps/32 rather than with the step count.
@compute @workgroup_size(BWD_WG)
fn bwd_column_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n4 = bp.cols / 4u;
    let c4 = bwd_linear_workgroup(wid, nwg) * BWD_WG + lid;
    if (c4 >= n4) {
        return;
    }
    var sum_dy = vec4<f32>(0.0);
    var sum_dy_xhat = vec4<f32>(0.0);
    for (var block = 0u; block < bp.tiles; block += 32u) {
        var block_dy = vec4<f32>(0.0);
        var block_dy_xhat = vec4<f32>(0.0);
        for (var step = block; step < min(block + 32u, bp.tiles); step++) {
            let at = column_sums_slot(step, c4);
            block_dy += work[at];
            block_dy_xhat += work[at + 8u];
        }
        sum_dy += block_dy;
        sum_dy_xhat += block_dy_xhat;
    }
    for (var k = 0u; k < 4u; k++) {
        store_affine_grads(4u * c4 + k, sum_dy_xhat[k], sum_dy[k]);
    }
}
