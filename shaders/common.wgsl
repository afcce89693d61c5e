// Shared declarations of the forward kernels: the parameters of one call and
// the bindings every forward kernel sees (a kernel uses a subset of them).
//
// The input is viewed as [P, A, G, B] (SPEC.md §1): statistics are taken per
// group (p, g) over the A·B elements x[p, a, g, b]. Element j of a group
// (0 <= j < A·B) lives at ((p·A + j / B)·G + g)·B + j % B.
//
// Statistics are kept per group as vec4(shift, dmean, rstd, var): the mean is
// shift + dmean, where shift is a value of the group (see group_shift) or,
// in rows_held, a first mean of the held values.
// Normalizing as ((x - shift) - dmean) keeps the digits that a large common
// offset would otherwise cost (x - shift is exact for nearby values, dmean
// is small).

struct Params {
    p: u32,
    a: u32,
    g: u32,
    b: u32,
    // Groups (P·G) and elements (P·A·G·B) of the whole tensor.
    n_groups: u32,
    total: u32,
    // Partials pass: tiles per group and elements per tile.
    tiles: u32,
    tile_len: u32,
    // Affine index of the element at (g, b) is (g·B + b) / affine_div.
    affine_div: u32,
    // Bit set of FLAG_* below.
    flags: u32,
    eps: f32,
    // Running-stat update: new = keep·old + take·batch (unless cumulative).
    keep: f32,
    take: f32,
    // Offset (in vec4) of the partials inside the scratch buffer.
    partials_offset: u32,
    // Tensors larger than one storage binding are processed in chunks: x and
    // y are bound to elements [chunk_base, chunk_base + chunk_len), so
    // load_x/store_y2 take indices relative to chunk_base.
    chunk_base: u32,
    chunk_len: u32,
    chunk_index: u32,
    // Partials per group over all chunks (tiles · chunk_span).
    merge_tiles: u32,
    // normalize_runs: workgroups per run of B elements, and vec4 groups per
    // invocation.
    run_blocks: u32,
    run_vec4: u32,
    // Elements per chunk (the last may be shorter), chunks, and the most
    // chunks one group's elements reach (`partials` keeps a group's tiles
    // of those chunks only).
    chunk_elems: u32,
    chunk_count: u32,
    chunk_span: u32,
    // The first group the tiled partials dispatch of the bound chunk covers
    // (src/engine.rs chunk_groups; 0 unless the tensor is split).
    group_offset: u32,
    // Exact division by B, G, A·G·B and affine_div as multiply-high and
    // shifts (fast_div.wgsl): integer division is a scalar loop on CPUs
    // that run WGSL (lavapipe), and slow on many GPUs too.
    div_b: vec4<u32>,
    div_g: vec4<u32>,
    div_agb: vec4<u32>,
    div_affine: vec4<u32>,
}

// Facts of the call fixed per pipeline (kernels::Variant) rather than read
// from `params`: hot loops then carry no branch on them. A branch on a
// uniform parameter inside a loop made the subgroup row kernel 1.35x slower
// on lavapipe, which masks every branch lane by lane.
override HAS_WEIGHT: bool = false;
override HAS_BIAS: bool = false;
// RMSNorm: no centering (shift and mean are zero).
override IS_RMS: bool = false;
// Where the parameters of four consecutive elements are (affine4):
// AFFINE_PER_ELEMENT (affine_div = 1), AFFINE_PER_RUN (affine_div = B, a
// multiple of four), AFFINE_PER_QUAD (affine_div another multiple of four)
// or AFFINE_GENERAL.
override AFFINE_MODE: u32 = 2u;
const AFFINE_PER_ELEMENT: u32 = 0u;
const AFFINE_PER_RUN: u32 = 1u;
const AFFINE_GENERAL: u32 = 2u;
const AFFINE_PER_QUAD: u32 = 3u;
// Rows the subgroup row kernel walks at a time (rows_subgroup.wgsl).
override ROWS_SG_R: u32 = 1u;
// Vectors of a row each lane holds in rows_held.wgsl (at most 8).
override HELD_K: u32 = 0u;

const FLAG_UPDATE_RUNNING: u32 = 8u;
const FLAG_CUMULATIVE: u32 = 16u;
const FLAG_UNBIASED: u32 = 32u;
const FLAG_BUMP_COUNTER: u32 = 64u;
const FLAG_SHIFT_IN_SCRATCH: u32 = 128u;
const FLAG_ZERO_RSTD: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
// γ and β, bound as vec4 (bindings are padded to 16 bytes) so that four
// consecutive parameters load as one vector.
@group(0) @binding(3) var<storage, read> weight: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<vec4<f32>>;

fn weight_at(c: u32) -> f32 {
    return weight[c >> 2u][c & 3u];
}

fn bias_at(c: u32) -> f32 {
    return bias[c >> 2u][c & 3u];
}
@group(0) @binding(5) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> running_var: array<f32>;
// num_batches_tracked as an i64 split in (low, high) u32 words.
@group(0) @binding(7) var<storage, read_write> counter: array<u32>;
// Per-group statistics first, then the partials of the stats pass.
@group(0) @binding(8) var<storage, read_write> scratch: array<vec4<f32>>;


fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// Zero, but only at run time (no flag sets every bit): see opaque() in
// compensated.wgsl.
fn opaque_zero() -> u32 {
    return select(0u, 1u, params.flags == 0xffffffffu);
}

fn has_flag(f: u32) -> bool {
    return (params.flags & f) != 0u;
}

// 1/sqrt(var + eps) of batch statistics; with FLAG_ZERO_RSTD 0 where
// var + eps is 0 (torch's InstanceNorm: with eps 0 a constant group gives
// β and zero gradients, where the other ops give NaN).
fn batch_rstd(variance: f32) -> f32 {
    if (has_flag(FLAG_ZERO_RSTD) && variance + params.eps == 0.0) {
        return 0.0;
    }
    return refined_rsqrt(variance + params.eps);
}

// Workgroups beyond 65535 are laid out on a 2-D grid; this is the linear index.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn element_index(p: u32, g: u32, j: u32) -> u32 {
    return element_index_at(p, g, run_pos(j, params.div_b));
}

// element_index of the element at `pos` (runs of B).
fn element_index_at(p: u32, g: u32, pos: RunPos) -> u32 {
    return ((p * params.a + pos.run) * params.g + g) * params.b + pos.off;
}

// Which of its chunk_span partial slots per tile group (p, g) takes from
// the bound chunk: the group's slots are those of chunk_span consecutive
// chunks from its first one (from chunk_count − chunk_span when that runs
// past the last chunk), which hold all its elements. Past that range (a
// chunk with none of them) the result wraps to at least chunk_span.
fn chunk_slot(p: u32, g: u32) -> u32 {
    let first = element_index(p, g, 0u) / params.chunk_elems;
    return params.chunk_index - min(first, params.chunk_count - params.chunk_span);
}

// The first j of group (p, g) whose element index is >= `index`. Element
// indices grow with j within a group, so a group's elements inside one chunk
// are the contiguous range [first_j(lo), first_j(hi)).
fn first_j(p: u32, g: u32, index: u32) -> u32 {
    let start = (p * params.a * params.g + g) * params.b;
    if (index <= start) {
        return 0u;
    }
    let t = index - start;
    let row = params.g * params.b;
    let j = (t / row) * params.b + min(t % row, params.b);
    return min(j, params.a * params.b);
}

// The median of three values: a shift that one outlier cannot pull away from
// the bulk of the data.
fn median3(a: f32, b: f32, c: f32) -> f32 {
    return max(min(a, b), min(max(a, b), c));
}

// The lower of the middle two of four values: one of them, as a shift
// must be. Sums of x − shift over half-precision data are then exact until
// they outgrow f32's 24 bits; the mean of the middle two, a bit off the
// data's grid, left LayerNorm of f16 rows of 16384 35 roundings off in
// the mean.
fn lower_median4(v: vec4<f32>) -> f32 {
    let lo = min(v.xy, v.zw);
    return max(lo.x, lo.y);
}

// The shift of group (p, g): the median of its first, middle and last
// elements (zero for RMS), close to the data even when one of them is an
// outlier, so the shifted sums cancel little (SPEC §6). Chunked
// tensors read it from scratch[group].x, where the shifts pass put it, and so
// do forwards with preset (replica-merged) statistics, whose host wrote it.
fn group_shift(p: u32, g: u32) -> f32 {
    if (IS_RMS) {
        return 0.0;
    }
    if (has_flag(FLAG_SHIFT_IN_SCRATCH)) {
        return scratch[p * params.g + g].x;
    }
    let n = params.a * params.b;
    return median3(
        load_x(element_index(p, g, 0u)),
        load_x(element_index(p, g, n / 2u)),
        load_x(element_index(p, g, n - 1u)),
    );
}

// A NaN test on the bits: a compiler may assume that a float comparison
// never meets a NaN, so `v != v` proves nothing.
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Chan et al.'s merge of two (count, mean, M2) summaries. Exact in the sense
// that it never subtracts large sums; order only changes rounding.
fn chan_merge(x: vec3<f32>, y: vec3<f32>) -> vec3<f32> {
    let n = x.x + y.x;
    if (n == 0.0) {
        return vec3<f32>(0.0, 0.0, 0.0);
    }
    let delta = y.y - x.y;
    let wy = y.x / n;
    var mean = x.y + delta * wy;
    // A summary with an infinite mean (an inf among its values) merged with
    // a finite one makes delta infinite, and x.y + delta·wy is inf − inf:
    // the weighted sum keeps the ±inf that torch's mean has (and inf − inf
    // between two infinite means stays NaN, as there).
    if (is_nan(mean) && !is_nan(x.y) && !is_nan(y.y)) {
        mean = x.y * (x.x / n) + y.y * wy;
    }
    let m2 = x.z + y.z + delta * delta * x.x * wy;
    return vec3<f32>(n, mean, m2);
}

fn affine(v: f32, g: u32, b: u32) -> f32 {
    let c = fast_div(g * params.b + b, params.div_affine);
    var r = v;
    if (HAS_WEIGHT) {
        r = r * weight_at(c);
    }
    if (HAS_BIAS) {
        r = r + bias_at(c);
    }
    return r;
}

// y from x and its group's statistics vec4(shift, dmean, rstd, var).
fn normalize_value(v: f32, st: vec4<f32>, g: u32, b: u32) -> f32 {
    return affine(((v - st.x) - st.y) * st.z, g, b);
}

// γ and β of four consecutive elements (where a parameter is absent, its
// slot is unused: apply_affine4 skips it).
struct Affine4 {
    weight: vec4<f32>,
    bias: vec4<f32>,
}

// The parameters of the four consecutive elements of group g whose g·B + b
// is 4·k4 (every caller's vec4 path starts at a multiple of four). Callers
// pass k4 as a plain sum with their vec4 index, so a lane's neighbours read
// neighbouring parameters and the compiler sees it. Branches depend on
// pipeline constants only, so they fold away.
fn affine_params4(g: u32, k4: u32) -> Affine4 {
    let k = 4u * k4;
    var a = Affine4(vec4<f32>(1.0), vec4<f32>(0.0));
    if (AFFINE_MODE == AFFINE_PER_ELEMENT) {
        // Four consecutive, aligned parameters: one vector each.
        if (HAS_WEIGHT) {
            a.weight = weight[k4];
        }
        if (HAS_BIAS) {
            a.bias = bias[k4];
        }
        return a;
    }
    if (AFFINE_MODE == AFFINE_PER_RUN) {
        // One parameter per run of B, a multiple of four (BatchNorm,
        // InstanceNorm): the four elements share it.
        if (HAS_WEIGHT) {
            a.weight = vec4<f32>(weight_at(g));
        }
        if (HAS_BIAS) {
            a.bias = vec4<f32>(bias_at(g));
        }
        return a;
    }
    if (AFFINE_MODE == AFFINE_PER_QUAD) {
        // The four share a parameter: k and affine_div are multiples of four.
        let c = fast_div(k, params.div_affine);
        if (HAS_WEIGHT) {
            a.weight = vec4<f32>(weight_at(c));
        }
        if (HAS_BIAS) {
            a.bias = vec4<f32>(bias_at(c));
        }
        return a;
    }
    let c = vec4<u32>(
        fast_div(k, params.div_affine),
        fast_div(k + 1u, params.div_affine),
        fast_div(k + 2u, params.div_affine),
        fast_div(k + 3u, params.div_affine),
    );
    if (HAS_WEIGHT) {
        a.weight = vec4<f32>(weight_at(c.x), weight_at(c.y), weight_at(c.z), weight_at(c.w));
    }
    if (HAS_BIAS) {
        a.bias = vec4<f32>(bias_at(c.x), bias_at(c.y), bias_at(c.z), bias_at(c.w));
    }
    return a;
}

// γ·v + β with the parameters of affine_params4 (an absent one is skipped,
// not applied as 1 or 0: v + 0 would turn −0 into +0).
fn apply_affine4(v: vec4<f32>, a: Affine4) -> vec4<f32> {
    var r = v;
    if (HAS_WEIGHT) {
        r = r * a.weight;
    }
    if (HAS_BIAS) {
        r = r + a.bias;
    }
    return r;
}

// γ·v + β for the four consecutive elements of affine_params4(g, k4).
fn affine4(v: vec4<f32>, g: u32, k4: u32) -> vec4<f32> {
    return apply_affine4(v, affine_params4(g, k4));
}

// The mean of statistics st as an f32 centre and the exact rest (TwoSum of
// shift and dmean): (x − centre) − rest is x − mean to one rounding.
fn split_mean(st: vec4<f32>) -> vec2<f32> {
    return two_sum(st.x, st.y);
}

// (centre, scale, offset) of a run with statistics st whose γ and β are
// those of affine index g (AFFINE_PER_RUN: BatchNorm, InstanceNorm), so that
// y = (x − centre)·scale + offset. Shared by normalize_runs,
// normalize_runs_subgroup and, per column, column_affine. Centred on the
// mean (split_mean), not on the shift, the offset is β and a tiny rest:
// an output near zero is then the difference of two terms of about |β|,
// not of |β| + |dmean·scale| (a shift 2σ from the mean put f16 outputs
// near zero 4 ulps off).
fn run_scale_offset(st: vec4<f32>, g: u32) -> vec3<f32> {
    let mean = split_mean(st);
    var scale = st.z;
    var offset = -mean.y * st.z;
    if (HAS_WEIGHT) {
        scale = scale * weight_at(g);
        offset = offset * weight_at(g);
    }
    if (HAS_BIAS) {
        offset = offset + bias_at(g);
    }
    return vec3<f32>(mean.x, scale, offset);
}

// Shared by the partials kernels (stats.wgsl, runs_subgroup.wgsl).

// (mean, M2) of `count` values from their sum and sum of squares, all
// shifted by the group's shift (group_shift; zero for RMS, whose "M2" is Σx²).
// The values are shifted by a value of their group (or few: STATS_PER_THREAD
// or a block of rows per invocation of the tiled kernels), so the subtraction
// loses little; Chan's merge does the rest. (partials_runs sums a whole
// run, as rows_subgroup sums a whole row.)
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

// (v, v²) for v = x − shift of the four elements from flat index i (a
// multiple of four, in the bound chunk).
fn shifted_terms4(i: u32, shift: f32) -> mat2x4<f32> {
    let v = load_x4((i - params.chunk_base) >> 2u) - shift;
    return mat2x4<f32>(v, v * v);
}

// (v0 + v1, v0² + v1²) for v = x − shift of the pair of vectors
// i8 (load_x8: one access where PAIRED_ACCESS).
fn shifted_pair_terms(i8: u32, shift: f32) -> mat2x4<f32> {
    let x = load_x8(i8);
    let v0 = x[0] - shift;
    let v1 = x[1] - shift;
    return mat2x4<f32>(v0 + v1, v0 * v0 + v1 * v1);
}

// The shifts (group_shift) of the four columns of vector q4 of p.
fn column_shifts(p: u32, q4: u32) -> vec4<f32> {
    var shift = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        shift[i] = group_shift(p, (4u * q4 + i) / params.b);
    }
    return shift;
}

// The mean of x − shift over the first COLUMN_PREFIX of the `rows` rows
// from row0 of p, for the four columns of vector q4: the centre of a
// column block's sums (kernels::COLUMN_PREFIX). Zero for RMS, whose sums
// are of x².
fn column_prefix(p: u32, row0: u32, rows: u32, q4: u32, shift: vec4<f32>) -> vec4<f32> {
    if (IS_RMS) {
        return vec4<f32>(0.0);
    }
    let n = min(rows, COLUMN_PREFIX);
    let l4 = (params.g * params.b) / 4u;
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < n; i++) {
        s += load_x4((p * params.a + row0 + i) * l4 + q4) - shift;
    }
    return s / f32(max(n, 1u));
}

// The partials of the four columns of vector q4 of p over row block
// `block` of `rows` rows, from the sums of d = (x − shift) − centre.
fn write_column_partials(p: u32, block: u32, q4: u32, rows: u32, centre: vec4<f32>, sum: vec4<f32>, sq: vec4<f32>) {
    for (var i = 0u; i < 4u; i++) {
        let q = 4u * q4 + i;
        let g = q / params.b;
        let b = q - g * params.b;
        let summary = shifted_summary(rows, sum[i], sq[i]);
        let slot = (p * params.g + g) * params.merge_tiles + b * params.tiles + block;
        scratch[params.partials_offset + slot] = vec4<f32>(f32(rows), centre[i] + summary.x, summary.y, 0.0);
    }
}

// y = (x − centre)·scale + offset for the four columns of vector q4 of p:
// rows centre, scale and offset, one column per element, each the
// run_scale_offset of its group's statistics and its own γ and β.
fn column_affine(p: u32, q4: u32) -> mat3x4<f32> {
    var k: mat3x4<f32>;
    for (var i = 0u; i < 4u; i++) {
        let q = 4u * q4 + i;
        let g = fast_div(q, params.div_b);
        let cso = run_scale_offset(scratch[p * params.g + g], fast_div(q, params.div_affine));
        k[0][i] = cso.x;
        k[1][i] = cso.y;
        k[2][i] = cso.z;
    }
    return k;
}
