// Channels-last statistics and normalize on CPU adapters with subgroups:
// partials_columns (stats.wgsl) and normalize_columns (normalize.wgsl) with
// each row of L = G·B columns walked whole by one subgroup. Lane `lane` of
// a `w`-wide subgroup owns the row's vectors lane, lane + w, ...
// (held_slots.wgsl, HELD_K per lane) and holds their columns' shifts and
// sums, or scale and offset, in registers while its subgroup walks a block
// of rows of one p. Each SIMD access then covers w contiguous vectors and
// the thread running the subgroup streams through the rows; the strip
// kernels give a lane 32 bytes of a row, so on rows longer than a SIMD of
// strips their SIMD reads a piece of each row and jumps to the next. The
// host takes these kernels where they measured faster (engine::held_columns).

fn slot_shift(p: u32, j4: u32, live: bool) -> vec4<f32> {
    if (live) {
        return column_shifts(p, j4);
    }
    return vec4<f32>(0.0);
}

fn octet_shifts(p: u32, j: U32x8, l: Livex8) -> Vec4x8 {
    return Vec4x8(
        slot_shift(p, j[0], l[0]), slot_shift(p, j[1], l[1]), slot_shift(p, j[2], l[2]), slot_shift(p, j[3], l[3]),
        slot_shift(p, j[4], l[4]), slot_shift(p, j[5], l[5]), slot_shift(p, j[6], l[6]), slot_shift(p, j[7], l[7]),
    );
}

// The centres of an octet's slots (column_prefix): the mean of x − shift
// over the block's first rows, which the block's sums subtract after the
// shift.
fn slot_centre(p: u32, row0: u32, rows: u32, j4: u32, live: bool, shift: vec4<f32>) -> vec4<f32> {
    if (live) {
        return column_prefix(p, row0, rows, j4, shift);
    }
    return vec4<f32>(0.0);
}

fn octet_centres(p: u32, row0: u32, rows: u32, j: U32x8, l: Livex8, s: Vec4x8) -> Vec4x8 {
    return Vec4x8(
        slot_centre(p, row0, rows, j[0], l[0], s[0]), slot_centre(p, row0, rows, j[1], l[1], s[1]),
        slot_centre(p, row0, rows, j[2], l[2], s[2]), slot_centre(p, row0, rows, j[3], l[3], s[3]),
        slot_centre(p, row0, rows, j[4], l[4], s[4]), slot_centre(p, row0, rows, j[5], l[5], s[5]),
        slot_centre(p, row0, rows, j[6], l[6], s[6]), slot_centre(p, row0, rows, j[7], l[7], s[7]),
    );
}

fn slot_column_partials(p: u32, block: u32, j4: u32, live: bool, rows: u32, centre: vec4<f32>, sum: vec4<f32>, sq: vec4<f32>) {
    if (live) {
        write_column_partials(p, block, j4, rows, centre, sum, sq);
    }
}

fn octet_column_partials(p: u32, block: u32, j: U32x8, l: Livex8, rows: u32, c: Vec4x8, sum: Vec4x8, sq: Vec4x8) {
    slot_column_partials(p, block, j[0], l[0], rows, c[0], sum[0], sq[0]);
    slot_column_partials(p, block, j[1], l[1], rows, c[1], sum[1], sq[1]);
    slot_column_partials(p, block, j[2], l[2], rows, c[2], sum[2], sq[2]);
    slot_column_partials(p, block, j[3], l[3], rows, c[3], sum[3], sq[3]);
    slot_column_partials(p, block, j[4], l[4], rows, c[4], sum[4], sq[4]);
    slot_column_partials(p, block, j[5], l[5], rows, c[5], sum[5], sq[5]);
    slot_column_partials(p, block, j[6], l[6], rows, c[6], sum[6], sq[6]);
    slot_column_partials(p, block, j[7], l[7], rows, c[7], sum[7], sq[7]);
}

alias Compensated4x8 = array<Compensated4, 8>;

// Each slot's compensated total plus the slot's block sum (compensated.wgsl).
fn octet_add_compensated(a: Compensated4x8, v: Vec4x8) -> Compensated4x8 {
    return Compensated4x8(
        add_compensated4(a[0], v[0]), add_compensated4(a[1], v[1]), add_compensated4(a[2], v[2]), add_compensated4(a[3], v[3]),
        add_compensated4(a[4], v[4]), add_compensated4(a[5], v[5]), add_compensated4(a[6], v[6]), add_compensated4(a[7], v[7]),
    );
}

fn octet_totals(a: Compensated4x8) -> Vec4x8 {
    return Vec4x8(
        compensated_total4(a[0]), compensated_total4(a[1]), compensated_total4(a[2]), compensated_total4(a[3]),
        compensated_total4(a[4]), compensated_total4(a[5]), compensated_total4(a[6]), compensated_total4(a[7]),
    );
}

// The partials of partials_columns: block k of p (params.tiles blocks of
// tile_len rows per p) gives each column its (count, mean, M2) over the
// block's rows, at the slot write_column_partials finds, from sums centred
// like the strips' (column_prefix). Dead slots load zeros against zero
// shifts and write nothing.
@compute @workgroup_size(ROWS_SG_WG)
fn partials_columns_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, ROWS_SG_WG, linear_workgroup(wid, nwg), nwg.x * nwg.y);
    if (steps.first == 0u && lane == 0u && has_flag(FLAG_BUMP_COUNTER)) {
        bump_counter_once();
    }
    let n4 = (params.g * params.b) / 4u;
    let slots = held_slots(lane, steps.width, n4);
    for (var block = steps.first; block < params.p * params.tiles; block += steps.stride) {
        let p = block / params.tiles;
        let of_p = block - p * params.tiles;
        let row0 = of_p * params.tile_len;
        let rows = min(params.tile_len, params.a - row0);
        let s0 = octet_shifts(p, slots.j0, slots.l0);
        let s1 = octet_shifts(p, slots.j1, slots.l1);
        let s2 = octet_shifts(p, slots.j2, slots.l2);
        let s3 = octet_shifts(p, slots.j3, slots.l3);
        let m0 = octet_centres(p, row0, rows, slots.j0, slots.l0, s0);
        let m1 = octet_centres(p, row0, rows, slots.j1, slots.l1, s1);
        let m2 = octet_centres(p, row0, rows, slots.j2, slots.l2, s2);
        let m3 = octet_centres(p, row0, rows, slots.j3, slots.l3, s3);
        var sum0: Compensated4x8;
        var sum1: Compensated4x8;
        var sum2: Compensated4x8;
        var sum3: Compensated4x8;
        var sq0: Compensated4x8;
        var sq1: Compensated4x8;
        var sq2: Compensated4x8;
        var sq3: Compensated4x8;
        for (var i0 = 0u; i0 < rows; i0 += COMPENSATED_BLOCK) {
            var block_sum0: Vec4x8;
            var block_sum1: Vec4x8;
            var block_sum2: Vec4x8;
            var block_sum3: Vec4x8;
            var block_sq0: Vec4x8;
            var block_sq1: Vec4x8;
            var block_sq2: Vec4x8;
            var block_sq3: Vec4x8;
            for (var i = i0; i < min(rows, i0 + COMPENSATED_BLOCK); i++) {
                let base4 = (p * params.a + row0 + i) * n4;
                let c0 = octet_sub(octet_sub(octet_x4(base4, slots.j0, slots.l0), s0), m0);
                let c1 = octet_sub(octet_sub(octet_x4(base4, slots.j1, slots.l1), s1), m1);
                let c2 = octet_sub(octet_sub(octet_x4(base4, slots.j2, slots.l2), s2), m2);
                let c3 = octet_sub(octet_sub(octet_x4(base4, slots.j3, slots.l3), s3), m3);
                block_sum0 = octet_add(block_sum0, c0);
                block_sum1 = octet_add(block_sum1, c1);
                block_sum2 = octet_add(block_sum2, c2);
                block_sum3 = octet_add(block_sum3, c3);
                block_sq0 = octet_add(block_sq0, octet_mul(c0, c0));
                block_sq1 = octet_add(block_sq1, octet_mul(c1, c1));
                block_sq2 = octet_add(block_sq2, octet_mul(c2, c2));
                block_sq3 = octet_add(block_sq3, octet_mul(c3, c3));
            }
            sum0 = octet_add_compensated(sum0, block_sum0);
            sum1 = octet_add_compensated(sum1, block_sum1);
            sum2 = octet_add_compensated(sum2, block_sum2);
            sum3 = octet_add_compensated(sum3, block_sum3);
            sq0 = octet_add_compensated(sq0, block_sq0);
            sq1 = octet_add_compensated(sq1, block_sq1);
            sq2 = octet_add_compensated(sq2, block_sq2);
            sq3 = octet_add_compensated(sq3, block_sq3);
        }
        octet_column_partials(p, of_p, slots.j0, slots.l0, rows, m0, octet_totals(sum0), octet_totals(sq0));
        octet_column_partials(p, of_p, slots.j1, slots.l1, rows, m1, octet_totals(sum1), octet_totals(sq1));
        octet_column_partials(p, of_p, slots.j2, slots.l2, rows, m2, octet_totals(sum2), octet_totals(sq2));
        octet_column_partials(p, of_p, slots.j3, slots.l3, rows, m3, octet_totals(sum3), octet_totals(sq3));
    }
}

alias Affine4x8 = array<mat3x4<f32>, 8>;

// The (shift, scale, offset) rows of a live slot's four columns
// (column_affine); zeros for a dead one.
fn slot_affine(p: u32, j4: u32, live: bool) -> mat3x4<f32> {
    if (live) {
        return column_affine(p, j4);
    }
    return mat3x4<f32>();
}

fn octet_affines(p: u32, j: U32x8, l: Livex8) -> Affine4x8 {
    return Affine4x8(
        slot_affine(p, j[0], l[0]), slot_affine(p, j[1], l[1]), slot_affine(p, j[2], l[2]), slot_affine(p, j[3], l[3]),
        slot_affine(p, j[4], l[4]), slot_affine(p, j[5], l[5]), slot_affine(p, j[6], l[6]), slot_affine(p, j[7], l[7]),
    );
}

// y of two consecutive slots (vectors j0 and j1 of the row at base4) where
// live, loaded and stored by the layout's accesses.
fn slots_normalize(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool, k0: mat3x4<f32>, k1: mat3x4<f32>) {
    let x = slots_x4(base4, j0, j1, l0, l1);
    slots_store_y4(base4, j0, j1, l0, l1, (x[0] - k0[0]) * k0[1] + k0[2], (x[1] - k1[0]) * k1[1] + k1[2]);
}

fn octet_normalize(base4: u32, j: U32x8, l: Livex8, k: Affine4x8) {
    slots_normalize(base4, j[0], j[1], l[0], l[1], k[0], k[1]);
    slots_normalize(base4, j[2], j[3], l[2], l[3], k[2], k[3]);
    slots_normalize(base4, j[4], j[5], l[4], l[5], k[4], k[5]);
    slots_normalize(base4, j[6], j[7], l[6], l[7], k[6], k[7]);
}

// y = (x − shift)·scale + offset, params.run_blocks blocks of run_vec4 rows
// per p.
@compute @workgroup_size(ROWS_SG_WG)
fn normalize_columns_held(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, ROWS_SG_WG, linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let n4 = (params.g * params.b) / 4u;
    let slots = held_slots(lane, steps.width, n4);
    for (var block = steps.first; block < params.p * params.run_blocks; block += steps.stride) {
        let p = block / params.run_blocks;
        let r0 = (block - p * params.run_blocks) * params.run_vec4;
        let r1 = min(r0 + params.run_vec4, params.a);
        let k0 = octet_affines(p, slots.j0, slots.l0);
        let k1 = octet_affines(p, slots.j1, slots.l1);
        let k2 = octet_affines(p, slots.j2, slots.l2);
        let k3 = octet_affines(p, slots.j3, slots.l3);
        for (var r = r0; r < r1; r++) {
            let base4 = (p * params.a + r) * n4;
            octet_normalize(base4, slots.j0, slots.l0, k0);
            octet_normalize(base4, slots.j1, slots.l1, k1);
            octet_normalize(base4, slots.j2, slots.l2, k2);
            octet_normalize(base4, slots.j3, slots.l3, k3);
        }
    }
}
