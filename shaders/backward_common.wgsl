// Shared declarations of the backward kernels (SPEC.md §4): the parameters of
// one dispatch, the bindings, and the per-element helpers.
//
// Two views of the same contiguous tensor are in play:
// - the *stats view* [SP, SA, SG, SB] of the forward pass: the statistics of
//   element i are stats[(i / (SA·SG·SB))·SG + (i / SB) % SG], saved by the
//   forward as vec4(shift, dmean, rstd, var); x̂ = ((x − shift) − dmean)·rstd
//   (shift = dmean = 0 for RMS, running mean and 0 in eval mode);
// - the *reduction view* [RP, RA, RG, RB] a partials/finalize dispatch sums
//   over: the stats view itself for the per-group sums, or [1, R, K, D] for
//   the affine gradients (K affine indices of D contiguous elements).
// The affine index of element i is (i % (SG·SB)) / affine_div.
//
// Per element the kernels form g = dy·γ and sum the vec4
// (g, g·x̂, dy, dy·x̂): the first two give grad_input, the last two grad_bias
// and grad_weight.
//
// Storage: x, grad_output and grad_input share one dtype; the
// backward_io_<dtype>.wgsl prepended by src/backward.rs declares their
// bindings (1, 2, 5), load_x/load_dy, store_dx and BWD_PACK. Arithmetic and
// every sum are f32; grad_input is rounded once, at the store. Parameter
// gradients are f32 whatever the storage.

struct BwdParams {
    sp: u32,
    sa: u32,
    sg: u32,
    sb: u32,
    rp: u32,
    ra: u32,
    rg: u32,
    rb: u32,
    // Reduction groups (RP·RG) and elements of the tensor.
    n_groups: u32,
    total: u32,
    // Partials: tiles per reduction group and elements per tile; the partial
    // of (group, tile) is work[partials_offset + group·group_stride + tile·tile_stride].
    tiles: u32,
    tile_len: u32,
    group_stride: u32,
    tile_stride: u32,
    partials_offset: u32,
    affine_div: u32,
    flags: u32,
    // Column kernel: rows R, columns L = SG·SB, rows per block.
    rows: u32,
    cols: u32,
    rows_per_block: u32,
    // The elements [chunk_base, chunk_base + chunk_len) x, grad_output and
    // grad_input are bound to (the whole tensor unless it is larger than
    // one storage binding: BWD_CHUNKED).
    chunk_base: u32,
    chunk_len: u32,
    // Split tensors: the bound chunk, the most chunks one reduction group
    // reaches, elements per chunk (the last may be shorter), and chunks.
    chunk_index: u32,
    chunk_span: u32,
    chunk_elems: u32,
    chunk_count: u32,
    // The first reduction group a split tensor's partials dispatch covers
    // (src/engine.rs chunk_groups; 0 otherwise).
    group_offset: u32,
    _pad1: u32,
    // Exact division by RB, SA·SG·SB, SB, SG, SG·SB and affine_div as
    // multiply-high and shifts (fast_div.wgsl; set by the host from the
    // fields above): integer division per element is a scalar loop on CPUs
    // that run WGSL.
    div_rb: vec4<u32>,
    div_sagsb: vec4<u32>,
    div_sb: vec4<u32>,
    div_sg: vec4<u32>,
    div_sgsb: vec4<u32>,
    div_affine: vec4<u32>,
}


// Facts fixed per pipeline rather than read from `bp.flags` (the host
// compiles one pipeline per combination, src/backward.rs): branches on them
// in per-element code fold away instead of being masked lane by lane.
// BWD_WEIGHT: γ multiplies dy. BWD_RMS: no centering. BWD_RUNNING: eval-mode
// statistics (dx = g·rstd).
override BWD_WEIGHT: bool = false;
override BWD_RMS: bool = false;
override BWD_RUNNING: bool = false;
// Affine layout of the stats view: 0 one parameter per element
// (affine_div = 1), 1 one per run (affine_div = SB), 3 one per a multiple of
// four elements that divides SB (channels-first GroupNorm: affine_div =
// H·W), 2 anything else (by division). bwd_rows, bwd_partials and bwd_dx use it to find the
// index once per run, or once per vector, instead of per element.
override BWD_AFFINE: u32 = 2u;
// Runs of the stats view (SB) are multiples of four: four consecutive
// elements from a multiple of four share their statistics group, and
// load and store as one vector (terms4, grad_input4).
override BWD_VEC4: bool = false;
// Groups bwd_rows_subgroup walks at a time: 1, or 4 when every group has
// the same affine parameters and no per-channel partials are written
// (LayerNorm, RMSNorm; the host checks), as the forward's ROWS_SG_R.
override BWD_ROWS_R: u32 = 1u;
// bwd_rows_subgroup also writes each step's column sums of dy and dy·x̂
// (bwd_column_sums finishes them): LayerNorm's dγ and dβ without reading x
// and dy again.
override BWD_COLUMN_SUMS: bool = false;
// Vectors of a row each lane holds in bwd_rows_held (held_slots.wgsl).
override HELD_K: u32 = 0u;
// The tensor is larger than one storage binding: x, grad_output and
// grad_input are bound chunk by chunk, and a dispatch touches only the
// elements of its chunk (in_chunk). Only bwd_partials' scalar paths,
// bwd_finalize and bwd_dx's scalar path run so (src/backward.rs,
// plan_chunked).
override BWD_CHUNKED: bool = false;

// Flat element index i in the bound chunk.
fn local(i: u32) -> u32 {
    if (BWD_CHUNKED) {
        return i - bp.chunk_base;
    }
    return i;
}

// Vector index i4 in the bound chunk (chunks start at multiples of 256).
fn local4(i4: u32) -> u32 {
    if (BWD_CHUNKED) {
        return i4 - bp.chunk_base / 4u;
    }
    return i4;
}

// Which of its chunk_span partial slots per tile reduction group (p, g)
// takes from the bound chunk: those of chunk_span consecutive chunks from
// the group's first (from chunk_count − chunk_span when that runs past the
// last chunk), which hold all its elements; a chunk it does not reach
// wraps to at least chunk_span (as stats.wgsl's chunk_slot).
fn bwd_chunk_slot(p: u32, g: u32) -> u32 {
    let first = reduction_index(p, g, 0u) / bp.chunk_elems;
    return bp.chunk_index - min(first, bp.chunk_count - bp.chunk_span);
}

// Whether element i is in the bound chunk.
fn in_chunk(i: u32) -> bool {
    return !BWD_CHUNKED || (i >= bp.chunk_base && i - bp.chunk_base < bp.chunk_len);
}

// Where the column sums of vector j4 over step `step` go (Σdy; Σdy·x̂ is 8
// vectors further): blocks of 8 vectors, each block's steps one after the
// other, so that bwd_column_sums, one invocation per vector, streams every
// block's 256 bytes per step contiguously. (A row of steps per step,
// 2·n4 vectors apart, made it wait on memory: lavapipe does not prefetch
// across the 8 KiB jumps.) `tiles` is the step count.
fn column_sums_slot(step: u32, j4: u32) -> u32 {
    return bp.partials_offset + ((j4 >> 3u) * bp.tiles + step) * 16u + (j4 & 7u);
}

const BF_WRITE_GSUM: u32 = 8u;
const BF_LOOP_P: u32 = 16u;
const BF_GRAD_WEIGHT: u32 = 32u;
const BF_GRAD_BIAS: u32 = 64u;
const BF_WRITE_PARTIALS: u32 = 128u;
const BF_ACCUMULATE: u32 = 4096u;
const BF_NAN_WEIGHT_GRAD: u32 = 8192u;

@group(0) @binding(0) var<uniform> bp: BwdParams;
// Bindings 1 (x), 2 (grad_output) and 5 (grad_input) are in backward_io_*.wgsl.
// γ, bound as vec4 (bindings are padded to 16 bytes) so that four
// consecutive parameters load as one vector.
@group(0) @binding(3) var<storage, read> weight: array<vec4<f32>>;
// The forward's statistics, vec4(shift, dmean, rstd, var) per stats group.
@group(0) @binding(4) var<storage, read> stats: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> grad_weight: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad_bias: array<f32>;
// Per stats group sums (first SP·SG vec4), then the partials.
@group(0) @binding(8) var<storage, read_write> work: array<vec4<f32>>;

// The affine index of flat element i: (i % (SG·SB)) / affine_div.
fn affine_index(i: u32) -> u32 {
    let l = bp.sg * bp.sb;
    return fast_div(i - fast_div(i, bp.div_sgsb) * l, bp.div_affine);
}

// The affine index of element base + j of a run of the stats view that
// starts at `base`, whose affine index is c0.
fn run_affine_index(base: u32, c0: u32, j: u32) -> u32 {
    if (BWD_AFFINE == 0u) {
        return c0 + j;
    }
    if (BWD_AFFINE == 1u) {
        return c0;
    }
    return affine_index(base + j);
}

fn weight_at(c: u32) -> f32 {
    return weight[c >> 2u][c & 3u];
}

// γ of the four elements i .. i + 3 (i a multiple of four, all in one run;
// BWD_VEC4), or ones without γ.
fn weight4_of(i: u32) -> vec4<f32> {
    if (!BWD_WEIGHT) {
        return vec4<f32>(1.0);
    }
    let c = affine_index(i);
    if (BWD_AFFINE == 0u) {
        // One parameter per element: c is a multiple of four, as i is.
        return weight[c >> 2u];
    }
    if (BWD_AFFINE == 1u || BWD_AFFINE == 3u) {
        // The four share a parameter (i and affine_div are multiples of four).
        return vec4<f32>(weight_at(c));
    }
    return vec4<f32>(weight_at(c), weight_at(affine_index(i + 1u)),
        weight_at(affine_index(i + 2u)), weight_at(affine_index(i + 3u)));
}

// γ of affine index c, or 1 without γ.
fn weight_of_group(c: u32) -> f32 {
    if (BWD_WEIGHT) {
        return weight_at(c);
    }
    return 1.0;
}

// (Σg, Σg·x̂, Σdy, Σdy·x̂) of elements that share one γ, w.
fn sums_with_weight(sum_dy: f32, sum_dy_xhat: f32, w: f32) -> vec4<f32> {
    return vec4<f32>(w * sum_dy, w * sum_dy_xhat, sum_dy, sum_dy_xhat);
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// Vectors per channel of a contiguous group of n4 vectors (the row
// kernels): with one parameter per run or per a multiple of four elements
// (BWD_AFFINE 1 or 3) a channel is affine_div elements, whose γ and
// gradient sums are the channel's; otherwise the whole group is one
// "channel" with a parameter per vector (group_weight4).
fn group_channel_len4(n4: u32) -> u32 {
    if (BWD_AFFINE == 1u || BWD_AFFINE == 3u) {
        return bp.affine_div / 4u;
    }
    return n4;
}

// γ of vector j4 of a group starting at `base` (first affine index c0),
// which lies in channel ch of group_channel_len4.
fn group_weight4(base: u32, c0: u32, ch: u32, j4: u32) -> vec4<f32> {
    if (BWD_AFFINE == 1u || BWD_AFFINE == 3u) {
        return vec4<f32>(weight_of_group(c0 + ch));
    }
    if (BWD_WEIGHT && BWD_AFFINE == 0u) {
        // One parameter per element: c0 and 4·j4 are multiples of four.
        return weight[(c0 >> 2u) + j4];
    }
    return weight4_of(base + 4u * j4);
}

// Zero, but only at run time (no flag sets every bit): see opaque() in
// compensated.wgsl.
fn opaque_zero() -> u32 {
    return select(0u, 1u, bp.flags == 0xffffffffu);
}

fn bwd_flag(f: u32) -> bool {
    return (bp.flags & f) != 0u;
}

fn bwd_linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Stats group of flat element i.
fn stats_group(i: u32) -> u32 {
    let ab = fast_div(i, bp.div_sb);
    return fast_div(i, bp.div_sagsb) * bp.sg + (ab - fast_div(ab, bp.div_sg) * bp.sg);
}

// (g, g·x̂, dy, dy·x̂) of flat element i.
fn element_terms(i: u32) -> vec4<f32> {
    return terms_with(i, stats[stats_group(i)], affine_index(i));
}

// element_terms with the statistics `st` and the affine index `c` of
// element i given (a caller that knows them for a whole run hoists them).
fn terms_with(i: u32, st: vec4<f32>, c: u32) -> vec4<f32> {
    let xhat = ((load_x(i) - st.x) - st.y) * st.z;
    let d = load_dy(i);
    var g = d;
    if (BWD_WEIGHT) {
        g = d * weight_at(c);
    }
    return vec4<f32>(g, g * xhat, d, d * xhat);
}

// The sums of element_terms over the elements 4·i4 .. 4·i4 + 3, with their
// statistics `st` and γ `w` (weight4_of).
fn terms4(i4: u32, st: vec4<f32>, w: vec4<f32>) -> vec4<f32> {
    return terms_of(load_x4(i4), load_dy4(i4), st, w);
}

// terms4 of the values x and d of x and grad_output.
fn terms_of(x: vec4<f32>, d: vec4<f32>, st: vec4<f32>, w: vec4<f32>) -> vec4<f32> {
    let xhat = ((x - st.x) - st.y) * st.z;
    var g = d;
    if (BWD_WEIGHT) {
        g = d * w;
    }
    return vec4<f32>(dot(g, vec4<f32>(1.0)), dot(g, xhat), dot(d, vec4<f32>(1.0)), dot(d, xhat));
}

// grad_input of flat element i from its group's sums s = (Σg, Σg·x̂, ., .).
fn grad_input_value(i: u32, s: vec4<f32>) -> f32 {
    return grad_input_with(i, s, stats[stats_group(i)], affine_index(i));
}

// grad_input_value with the statistics and affine index given.
fn grad_input_with(i: u32, s: vec4<f32>, st: vec4<f32>, c: u32) -> f32 {
    var g = load_dy(i);
    if (BWD_WEIGHT) {
        g = g * weight_at(c);
    }
    if (BWD_RUNNING) {
        return g * st.z;
    }
    let xhat = ((load_x(i) - st.x) - st.y) * st.z;
    return grad_from(vec4<f32>(g), vec4<f32>(xhat), s, st).x;
}

// grad_input from g = dy·γ and x̂ (up to four elements of one group), the
// group's sums s = (Σg, Σg·x̂, ., .) and statistics st:
// rstd/n·(n·g − Σg − x̂·Σg·x̂), written with means to keep values small.
fn grad_from(g: vec4<f32>, xhat: vec4<f32>, s: vec4<f32>, st: vec4<f32>) -> vec4<f32> {
    let inv_n = 1.0 / f32(bp.sa * bp.sb);
    var mean_g = s.x * inv_n;
    if (BWD_RMS) {
        mean_g = 0.0;
    }
    return st.z * ((g - mean_g) - xhat * (s.y * inv_n));
}

// grad_input of the elements 4·i4 .. 4·i4 + 3 (grad_input_with for four).
fn grad_input4(i4: u32, s: vec4<f32>, st: vec4<f32>, w: vec4<f32>) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if (!BWD_RUNNING) {
        x = load_x4(i4);
    }
    return grad_input_of(load_dy4(i4), x, s, st, w);
}

// grad_input4 from the four elements' dy and x, already loaded.
fn grad_input_of(dy: vec4<f32>, x: vec4<f32>, s: vec4<f32>, st: vec4<f32>, w: vec4<f32>) -> vec4<f32> {
    var g = dy;
    if (BWD_WEIGHT) {
        g = g * w;
    }
    if (BWD_RUNNING) {
        return g * st.z;
    }
    return grad_from(g, ((x - st.x) - st.y) * st.z, s, st);
}

// grad_input regrouped for elements that share statistics st, group sums
// s = (Σg, Σg·x̂, ., .) and γ w: (a, b, c, shift) with
// grad_input = a·dy + b·(x − shift) + c. From
// rstd·((g − Σg/n) − x̂·Σg·x̂/n) with x̂ = ((x − shift) − dmean)·rstd;
// x − shift is exact for values near the group's, as in the forward, so a
// large common offset costs no digits. Eval mode (BWD_RUNNING): b = c = 0.
fn dx_coefficients(st: vec4<f32>, s: vec4<f32>, w: f32) -> vec4<f32> {
    let a = st.z * w;
    if (BWD_RUNNING) {
        return vec4<f32>(a, 0.0, 0.0, st.x);
    }
    let inv_n = 1.0 / f32(bp.sa * bp.sb);
    var mean_g = s.x * inv_n;
    if (BWD_RMS) {
        mean_g = 0.0;
    }
    let r2 = st.z * st.z * (s.y * inv_n);
    return vec4<f32>(a, -r2, r2 * st.y - st.z * mean_g, st.x);
}

// grad_input of the elements 4·i4 .. 4·i4 + 3 from coefficients (a, b, c,
// shift) of dx_coefficients (each a scalar or one per element).
fn dx_from(i4: u32, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, shift: vec4<f32>) -> vec4<f32> {
    let g = a * load_dy4(i4);
    if (BWD_RUNNING) {
        return g;
    }
    return g + b * (load_x4(i4) - shift) + c;
}
