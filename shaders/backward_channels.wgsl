// Backward kernels for channels-last statistics (SP = 1, SB = 1: BatchNorm
// over [N, ..., C] and BatchNorm1d over (N, C)): the tensor is R = SA rows
// of L = SG channels, element (r, c) at r·L + c, and channel c is both its
// statistics group and its affine index. L is a multiple of four (the host
// checks), so a row is whole vectors.
//
// Each invocation owns a strip of two vectors (eight channels; the last
// strip of an odd vector count repeats its one vector) over a block of
// rows, and loads the strip's statistics, γ and sums once: per row it only
// reads x and dy and writes dx. Invocations are numbered block-major, so
// neighbouring invocations read neighbouring strips of one row, and each
// reads 32 contiguous bytes of a row (CPUs that run WGSL stream longer
// pieces much faster, see bwd_cols).

// Statistics of the four channels 4·v4 .. 4·v4 + 3.
struct ChannelQuad {
    shift: vec4<f32>,
    dmean: vec4<f32>,
    rstd: vec4<f32>,
    // Their γ (ones without γ).
    weight: vec4<f32>,
}

fn channel_quad(v4: u32) -> ChannelQuad {
    var q: ChannelQuad;
    for (var k = 0u; k < 4u; k++) {
        let st = stats[4u * v4 + k];
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

// The strip of invocation `inv`: (row block, first vector, second vector),
// or a block ≥ bp.tiles past the end.
fn channel_strip(inv: u32) -> vec3<u32> {
    let cols4 = bp.cols / 4u;
    let strips = (cols4 + 1u) / 2u;
    let block = inv / strips;
    let v0 = 2u * (inv - block * strips);
    return vec3<u32>(block, v0, min(v0 + 1u, cols4 - 1u));
}

// Per channel (Σg, Σg·x̂, Σdy, Σdy·x̂) over a block of rows: the channel's
// group sums and gradients with one block (write_column), else partials
// merged by bwd_finalize.
@compute @workgroup_size(BWD_WG)
fn bwd_channel_cols(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let strip = channel_strip(bwd_linear_workgroup(wid, nwg) * BWD_WG + lid);
    if (strip.x >= bp.tiles) {
        return;
    }
    let cols4 = bp.cols / 4u;
    let q0 = channel_quad(strip.y);
    let q1 = channel_quad(strip.z);
    let r0 = strip.x * bp.rows_per_block;
    let r1 = min(r0 + bp.rows_per_block, bp.rows);
    var dy0 = vec4<f32>(0.0);
    var dyx0 = vec4<f32>(0.0);
    var dy1 = vec4<f32>(0.0);
    var dyx1 = vec4<f32>(0.0);
    for (var r = r0; r < r1; r++) {
        let row = r * cols4;
        let d0 = load_dy4(row + strip.y);
        dy0 += d0;
        dyx0 += d0 * (((load_x4(row + strip.y) - q0.shift) - q0.dmean) * q0.rstd);
        let d1 = load_dy4(row + strip.z);
        dy1 += d1;
        dyx1 += d1 * (((load_x4(row + strip.z) - q1.shift) - q1.dmean) * q1.rstd);
    }
    write_channel_quad(strip.y, strip.x, q0.weight, dy0, dyx0);
    if (strip.z != strip.y) {
        write_channel_quad(strip.z, strip.x, q1.weight, dy1, dyx1);
    }
}

// write_column for the four channels of vector v4 (Σg = γ·Σdy, as γ is
// the channel's).
fn write_channel_quad(v4: u32, block: u32, w: vec4<f32>, sum_dy: vec4<f32>, sum_dy_xhat: vec4<f32>) {
    for (var k = 0u; k < 4u; k++) {
        let s = vec4<f32>(w[k] * sum_dy[k], w[k] * sum_dy_xhat[k], sum_dy[k], sum_dy_xhat[k]);
        write_column(4u * v4 + k, block, s);
    }
}

// grad_input = a·dy + b·(x − shift) + c per channel, the coefficients
// found once per strip from the channel's statistics and group sums
// (work[c]; not read in eval mode, BF_RUNNING, where b = c = 0):
// rstd·((g − Σg/n) − x̂·Σg·x̂/n) with x̂ = ((x − shift) − dmean)·rstd,
// regrouped. x − shift is exact for values near the channel's, as in the
// forward, so a large common offset costs no digits.
@compute @workgroup_size(BWD_WG)
fn bwd_channel_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let strip = channel_strip(bwd_linear_workgroup(wid, nwg) * BWD_WG + lid);
    if (strip.x >= bp.tiles) {
        return;
    }
    let cols4 = bp.cols / 4u;
    let k0 = channel_coefficients(strip.y);
    let k1 = channel_coefficients(strip.z);
    let r0 = strip.x * bp.rows_per_block;
    let r1 = min(r0 + bp.rows_per_block, bp.rows);
    for (var r = r0; r < r1; r++) {
        let row = r * cols4;
        store_dx4(row + strip.y, channel_dx(row + strip.y, k0));
        store_dx4(row + strip.z, channel_dx(row + strip.z, k1));
    }
}

// grad_input of four channels as a·dy + b·(x − shift) + c.
struct ChannelCoefficients {
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
    shift: vec4<f32>,
}

fn channel_coefficients(v4: u32) -> ChannelCoefficients {
    let q = channel_quad(v4);
    var k: ChannelCoefficients;
    k.a = q.rstd * q.weight;
    k.shift = q.shift;
    if (BWD_RUNNING) {
        k.b = vec4<f32>(0.0);
        k.c = vec4<f32>(0.0);
        return k;
    }
    let inv_n = 1.0 / f32(bp.sa * bp.sb);
    var mean_g = vec4<f32>(0.0);
    var mean_gx = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let s = work[4u * v4 + j];
        mean_g[j] = s.x * inv_n;
        mean_gx[j] = s.y * inv_n;
    }
    if (BWD_RMS) {
        mean_g = vec4<f32>(0.0);
    }
    let r2 = q.rstd * q.rstd * mean_gx;
    k.b = -r2;
    k.c = r2 * q.dmean - q.rstd * mean_g;
    return k;
}

fn channel_dx(i4: u32, k: ChannelCoefficients) -> vec4<f32> {
    let g = k.a * load_dy4(i4);
    if (BWD_RUNNING) {
        return g;
    }
    return g + k.b * (load_x4(i4) - k.shift) + k.c;
}
