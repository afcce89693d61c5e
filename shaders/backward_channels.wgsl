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
        write_column(4u * v4 + k, block, sums_with_weight(sum_dy[k], sum_dy_xhat[k], w[k]));
    }
}

// grad_input = a·dy + b·(x − shift) + c per channel (dx_coefficients),
// the coefficients found once per strip from the channel's statistics,
// group sums (work[c]; not read in eval mode) and γ.
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
        store_dx4(row + strip.y, dx_from(row + strip.y, k0[0], k0[1], k0[2], k0[3]));
        store_dx4(row + strip.z, dx_from(row + strip.z, k1[0], k1[1], k1[2], k1[3]));
    }
}

// dx_coefficients of the four channels of vector v4, transposed: rows a,
// b, c and shift, one column per channel.
fn channel_coefficients(v4: u32) -> mat4x4<f32> {
    var k: mat4x4<f32>;
    for (var j = 0u; j < 4u; j++) {
        let c = 4u * v4 + j;
        var s = vec4<f32>(0.0);
        if (!BWD_RUNNING) {
            s = work[c];
        }
        let kc = dx_coefficients(stats[c], s, weight_of_group(c));
        k[0][j] = kc.x;
        k[1][j] = kc.y;
        k[2][j] = kc.z;
        k[3][j] = kc.w;
    }
    return k;
}
