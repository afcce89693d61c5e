// Backward kernels for channels-last statistics: each p of the stats view
// is SA rows of L = SG·SB channels, element (p, r, c) at (p·SA + r)·L + c,
// channel c in statistics group p·SG + c / SB and with affine index c
// (affine_div = 1). This is BatchNorm over [N, ..., C] or (N, C) (SP = 1,
// SB = 1) and Keras's GroupNormalization over [N, ..., C] (SP = N, groups
// of SB channels). L is a multiple of four (the host checks), so a row is
// whole vectors.
//
// Each invocation owns a strip of two vectors (eight channels; the last
// strip of an odd vector count repeats its one vector) over a block of
// rows of one p, and loads the strip's statistics, γ and sums once: per row
// it only reads x and dy (and writes dx). Invocations are numbered
// (p, block)-major, so neighbouring invocations read neighbouring strips of
// one row, and each reads 32 contiguous bytes of a row (CPUs that run WGSL
// stream longer pieces much faster, see bwd_cols).
//
// bwd_channel_cols writes the sums of channel c over block b of p as the
// partial work[partials_offset + (p·L + c)·tiles + b]; the host merges
// them into each group's sums (over the group's channels and blocks) and
// into dγ and dβ (over every p and block) with bwd_finalize. With one p,
// one channel per group and one block (BatchNorm, few rows) it writes the
// results directly.

// Statistics of the four channels 4·v4 .. 4·v4 + 3 of p.
struct ChannelQuad {
    shift: vec4<f32>,
    dmean: vec4<f32>,
    rstd: vec4<f32>,
    // Their γ (ones without γ).
    weight: vec4<f32>,
}

// Statistics group of channel c of p.
fn channel_group(p: u32, c: u32) -> u32 {
    return p * bp.sg + fast_div(c, bp.div_sb);
}

fn channel_quad(p: u32, v4: u32) -> ChannelQuad {
    var q: ChannelQuad;
    for (var k = 0u; k < 4u; k++) {
        let st = stats[channel_group(p, 4u * v4 + k)];
        q.shift[k] = st.x;
        q.dmean[k] = st.y;
        q.rstd[k] = st.z;
    }
    q.weight = vec4<f32>(1.0);
    if (BWD_WEIGHT) {
        q.weight = weight[v4];
    }
    return q;
}

// The work of one invocation: a strip of two vectors of p's rows r0..r1
// (the second vector repeats the first in the last strip of an odd count).
struct ChannelStrip {
    p: u32,
    block: u32,
    v0: u32,
    v1: u32,
    r0: u32,
    r1: u32,
}

// The strip of invocation `inv` (p ≥ SP past the end), numbered
// (p, block)-major.
fn channel_strip(inv: u32) -> ChannelStrip {
    let cols4 = bp.cols / 4u;
    let strips = (cols4 + 1u) / 2u;
    let pb = inv / strips;
    var c: ChannelStrip;
    c.p = pb / bp.tiles;
    c.block = pb - c.p * bp.tiles;
    c.v0 = 2u * (inv - pb * strips);
    c.v1 = min(c.v0 + 1u, cols4 - 1u);
    c.r0 = c.block * bp.rows_per_block;
    c.r1 = min(c.r0 + bp.rows_per_block, bp.sa);
    return c;
}

// Per channel (Σg, Σg·x̂, Σdy, Σdy·x̂) over a block of rows of one p.
@compute @workgroup_size(BWD_WG)
fn bwd_channel_cols(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = channel_strip(bwd_linear_workgroup(wid, nwg) * BWD_WG + lid);
    if (c.p >= bp.sp) {
        return;
    }
    let cols4 = bp.cols / 4u;
    let q0 = channel_quad(c.p, c.v0);
    let q1 = channel_quad(c.p, c.v1);
    var dy0 = vec4<f32>(0.0);
    var dyx0 = vec4<f32>(0.0);
    var dy1 = vec4<f32>(0.0);
    var dyx1 = vec4<f32>(0.0);
    for (var r = c.r0; r < c.r1; r++) {
        let row = (c.p * bp.sa + r) * cols4;
        let d0 = load_dy4(row + c.v0);
        dy0 += d0;
        dyx0 += d0 * (((load_x4(row + c.v0) - q0.shift) - q0.dmean) * q0.rstd);
        let d1 = load_dy4(row + c.v1);
        dy1 += d1;
        dyx1 += d1 * (((load_x4(row + c.v1) - q1.shift) - q1.dmean) * q1.rstd);
    }
    write_channel_quad(c.p, c.v0, c.block, q0.weight, dy0, dyx0);
    if (c.v1 != c.v0) {
        write_channel_quad(c.p, c.v1, c.block, q1.weight, dy1, dyx1);
    }
}

// Stores the sums of the four channels of vector v4 of p over row block
// `block` (Σg = γ·Σdy, as γ is the channel's): the partials, or with one
// p, one channel per group and one block the results themselves.
fn write_channel_quad(p: u32, v4: u32, block: u32, w: vec4<f32>, sum_dy: vec4<f32>, sum_dy_xhat: vec4<f32>) {
    let direct = bp.tiles == 1u && bp.sp == 1u && bp.sb == 1u;
    for (var k = 0u; k < 4u; k++) {
        let c = 4u * v4 + k;
        let s = sums_with_weight(sum_dy[k], sum_dy_xhat[k], w[k]);
        if (direct) {
            write_column(c, 0u, s);
        } else {
            work[bp.partials_offset + (p * bp.cols + c) * bp.tiles + block] = s;
        }
    }
}

// grad_input = a·dy + b·(x − shift) + c per channel (dx_coefficients),
// the coefficients found once per strip from the channel's statistics,
// its group's sums (work[group]; not read in eval mode) and its γ.
@compute @workgroup_size(BWD_WG)
fn bwd_channel_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = channel_strip(bwd_linear_workgroup(wid, nwg) * BWD_WG + lid);
    if (c.p >= bp.sp) {
        return;
    }
    let cols4 = bp.cols / 4u;
    let k0 = channel_coefficients(c.p, c.v0);
    let k1 = channel_coefficients(c.p, c.v1);
    for (var r = c.r0; r < c.r1; r++) {
        let row = (c.p * bp.sa + r) * cols4;
        store_dx4(row + c.v0, dx_from(row + c.v0, k0[0], k0[1], k0[2], k0[3]));
        store_dx4(row + c.v1, dx_from(row + c.v1, k1[0], k1[1], k1[2], k1[3]));
    }
}

// dx_coefficients of the four channels of vector v4 of p, transposed: rows
// a, b, c and shift, one column per channel.
fn channel_coefficients(p: u32, v4: u32) -> mat4x4<f32> {
    var k: mat4x4<f32>;
    for (var j = 0u; j < 4u; j++) {
        let c = 4u * v4 + j;
        let group = channel_group(p, c);
        var s = vec4<f32>(0.0);
        if (!BWD_RUNNING) {
            s = work[group];
        }
        let kc = dx_coefficients(stats[group], s, weight_of_group(c));
        k[0][j] = kc.x;
        k[1][j] = kc.y;
        k[2][j] = kc.z;
        k[3][j] = kc.w;
    }
    return k;
}
