// Channels-last grad_input on CPU adapters with subgroups: bwd_channel_dx
// (backward_channels.wgsl) with each row walked whole by one subgroup.
// A subgroup takes blocks of bp.rows_per_block rows of one p (bp.tiles
// blocks per p); lane `lane` of a `w`-wide subgroup owns the row's vectors
// lane, lane + w, ... (held_slots.wgsl, up to HELD_K per lane), finds their
// channels' coefficients once per block and holds them in registers. Each
// SIMD access then covers w contiguous vectors and the thread running the
// subgroup streams through the block's rows; in bwd_channel_dx a lane owns
// a strip of 32 bytes, so on rows longer than eight strips its SIMD reads a
// piece of each row and jumps to the next. Measured with a standalone
// kernel on lavapipe: rows of 1 KiB (Keras GroupNorm, 256 channels) 3.5 →
// 2.1 ms for 8 MiB; rows of 256 B (BatchNorm, 64 channels) the same.
alias Coefficients4x8 = array<mat4x4<f32>, 8>;

// One of the bp.sp · bp.tiles blocks of bp.rows_per_block rows: its p, its
// index among p's blocks and its rows r0 .. r1 of p.
struct ChannelBlock {
    p: u32,
    of_p: u32,
    r0: u32,
    r1: u32,
}

fn channel_block(block: u32) -> ChannelBlock {
    let p = block / bp.tiles;
    let of_p = block - p * bp.tiles;
    let r0 = of_p * bp.rows_per_block;
    return ChannelBlock(p, of_p, r0, min(r0 + bp.rows_per_block, bp.sa));
}

// The (a, b, c, shift) rows of a live slot's four channels; zeros (and no
// statistics read) for a dead one.
fn slot_coefficients(p: u32, j4: u32, live: bool) -> mat4x4<f32> {
    if (live) {
        return channel_coefficients(p, j4);
    }
    return mat4x4<f32>();
}

fn octet_coefficients(p: u32, j: U32x8, l: Livex8) -> Coefficients4x8 {
    return Coefficients4x8(
        slot_coefficients(p, j[0], l[0]), slot_coefficients(p, j[1], l[1]),
        slot_coefficients(p, j[2], l[2]), slot_coefficients(p, j[3], l[3]),
        slot_coefficients(p, j[4], l[4]), slot_coefficients(p, j[5], l[5]),
        slot_coefficients(p, j[6], l[6]), slot_coefficients(p, j[7], l[7]),
    );
}

fn slot_channel_dx(base4: u32, j4: u32, live: bool, k: mat4x4<f32>) {
    if (live) {
        store_dx4(base4 + j4, dx_from(base4 + j4, k[0], k[1], k[2], k[3]));
    }
}

fn octet_channel_dx(base4: u32, j: U32x8, l: Livex8, k: Coefficients4x8) {
    slot_channel_dx(base4, j[0], l[0], k[0]);
    slot_channel_dx(base4, j[1], l[1], k[1]);
    slot_channel_dx(base4, j[2], l[2], k[2]);
    slot_channel_dx(base4, j[3], l[3], k[3]);
    slot_channel_dx(base4, j[4], l[4], k[4]);
    slot_channel_dx(base4, j[5], l[5], k[5]);
    slot_channel_dx(base4, j[6], l[6], k[6]);
    slot_channel_dx(base4, j[7], l[7], k[7]);
}

@compute @workgroup_size(BWD_SG_WG)
fn bwd_channel_dx_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, BWD_SG_WG, bwd_linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let n4 = bp.cols / 4u;
    let slots = held_slots(lane, steps.width, n4);
    for (var block = steps.first; block < bp.sp * bp.tiles; block += steps.stride) {
        let b = channel_block(block);
        let p = b.p;
        let k0 = octet_coefficients(p, slots.j0, slots.l0);
        let k1 = octet_coefficients(p, slots.j1, slots.l1);
        let k2 = octet_coefficients(p, slots.j2, slots.l2);
        let k3 = octet_coefficients(p, slots.j3, slots.l3);
        for (var r = b.r0; r < b.r1; r++) {
            let base4 = (p * bp.sa + r) * n4;
            octet_channel_dx(base4, slots.j0, slots.l0, k0);
            octet_channel_dx(base4, slots.j1, slots.l1, k1);
            octet_channel_dx(base4, slots.j2, slots.l2, k2);
            octet_channel_dx(base4, slots.j3, slots.l3, k3);
        }
    }
}

// bwd_channel_cols the same way: a subgroup walks a block of rows of one p
// whole, each lane holding its vectors' statistics and adding up Σdy and
// Σdy·x̂ of their channels in registers, written once per block
// (write_channel_quad). Dead slots load zeros against zero statistics and
// add nothing.
alias Quad4x8 = array<ChannelQuad, 8>;

fn slot_quad(p: u32, j4: u32, live: bool) -> ChannelQuad {
    if (live) {
        return channel_quad(p, j4);
    }
    return ChannelQuad();
}

fn octet_quads(p: u32, j: U32x8, l: Livex8) -> Quad4x8 {
    return Quad4x8(
        slot_quad(p, j[0], l[0]), slot_quad(p, j[1], l[1]), slot_quad(p, j[2], l[2]), slot_quad(p, j[3], l[3]),
        slot_quad(p, j[4], l[4]), slot_quad(p, j[5], l[5]), slot_quad(p, j[6], l[6]), slot_quad(p, j[7], l[7]),
    );
}

fn quad_xhat(x: vec4<f32>, q: ChannelQuad) -> vec4<f32> {
    return ((x - q.shift) - q.dmean) * q.rstd;
}

// dy·x̂ of an octet's slots in one row.
fn octet_dy_xhat(dy: Vec4x8, x: Vec4x8, q: Quad4x8) -> Vec4x8 {
    return Vec4x8(
        dy[0] * quad_xhat(x[0], q[0]), dy[1] * quad_xhat(x[1], q[1]),
        dy[2] * quad_xhat(x[2], q[2]), dy[3] * quad_xhat(x[3], q[3]),
        dy[4] * quad_xhat(x[4], q[4]), dy[5] * quad_xhat(x[5], q[5]),
        dy[6] * quad_xhat(x[6], q[6]), dy[7] * quad_xhat(x[7], q[7]),
    );
}

fn slot_write_quad(p: u32, block: u32, j4: u32, live: bool, q: ChannelQuad, dy: vec4<f32>, dy_xhat: vec4<f32>) {
    if (live) {
        write_channel_quad(p, j4, block, q.weight, dy, dy_xhat);
    }
}

fn octet_write_quads(p: u32, block: u32, j: U32x8, l: Livex8, q: Quad4x8, dy: Vec4x8, dy_xhat: Vec4x8) {
    slot_write_quad(p, block, j[0], l[0], q[0], dy[0], dy_xhat[0]);
    slot_write_quad(p, block, j[1], l[1], q[1], dy[1], dy_xhat[1]);
    slot_write_quad(p, block, j[2], l[2], q[2], dy[2], dy_xhat[2]);
    slot_write_quad(p, block, j[3], l[3], q[3], dy[3], dy_xhat[3]);
    slot_write_quad(p, block, j[4], l[4], q[4], dy[4], dy_xhat[4]);
    slot_write_quad(p, block, j[5], l[5], q[5], dy[5], dy_xhat[5]);
    slot_write_quad(p, block, j[6], l[6], q[6], dy[6], dy_xhat[6]);
    slot_write_quad(p, block, j[7], l[7], q[7], dy[7], dy_xhat[7]);
}

@compute @workgroup_size(BWD_SG_WG)
fn bwd_channel_cols_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, BWD_SG_WG, bwd_linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let n4 = bp.cols / 4u;
    let slots = held_slots(lane, steps.width, n4);
    for (var block = steps.first; block < bp.sp * bp.tiles; block += steps.stride) {
        let b = channel_block(block);
        let p = b.p;
        let q0 = octet_quads(p, slots.j0, slots.l0);
        let q1 = octet_quads(p, slots.j1, slots.l1);
        let q2 = octet_quads(p, slots.j2, slots.l2);
        let q3 = octet_quads(p, slots.j3, slots.l3);
        var dy0: Vec4x8;
        var dy1: Vec4x8;
        var dy2: Vec4x8;
        var dy3: Vec4x8;
        var dy_xhat0: Vec4x8;
        var dy_xhat1: Vec4x8;
        var dy_xhat2: Vec4x8;
        var dy_xhat3: Vec4x8;
        for (var r = b.r0; r < b.r1; r++) {
            let base4 = (p * bp.sa + r) * n4;
            let d0 = octet_dy4(base4, slots.j0, slots.l0);
            let d1 = octet_dy4(base4, slots.j1, slots.l1);
            let d2 = octet_dy4(base4, slots.j2, slots.l2);
            let d3 = octet_dy4(base4, slots.j3, slots.l3);
            dy0 = octet_add(dy0, d0);
            dy1 = octet_add(dy1, d1);
            dy2 = octet_add(dy2, d2);
            dy3 = octet_add(dy3, d3);
            dy_xhat0 = octet_add(dy_xhat0, octet_dy_xhat(d0, octet_x4(base4, slots.j0, slots.l0), q0));
            dy_xhat1 = octet_add(dy_xhat1, octet_dy_xhat(d1, octet_x4(base4, slots.j1, slots.l1), q1));
            dy_xhat2 = octet_add(dy_xhat2, octet_dy_xhat(d2, octet_x4(base4, slots.j2, slots.l2), q2));
            dy_xhat3 = octet_add(dy_xhat3, octet_dy_xhat(d3, octet_x4(base4, slots.j3, slots.l3), q3));
        }
        octet_write_quads(p, b.of_p, slots.j0, slots.l0, q0, dy0, dy_xhat0);
        octet_write_quads(p, b.of_p, slots.j1, slots.l1, q1, dy1, dy_xhat1);
        octet_write_quads(p, b.of_p, slots.j2, slots.l2, q2, dy2, dy_xhat2);
        octet_write_quads(p, b.of_p, slots.j3, slots.l3, q3, dy3, dy_xhat3);
    }
}
