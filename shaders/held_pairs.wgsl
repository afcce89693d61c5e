// The held slots' layout of two vectors per access (held_slots.wgsl), with
// io_half_pairs.wgsl: slots 2q and 2q + 1 of lane l hold the adjacent
// vectors 2·(l + q·w) and 2·(l + q·w) + 1, loaded and stored as one 16-byte
// access (load_x8, store_y8). The host picks it for half storage when rows
// have an even count of vectors n4 (so a row starts at a whole pair and
// both slots of a pair are live or dead together) and makes HELD_K even
// (engine::held_layout).

// The vectors of slots first .. first + 7 (first a multiple of 8: pairs
// first / 2 .. first / 2 + 3) of a lane of a `w`-wide subgroup.
fn octet_columns(lane: u32, w: u32, first: u32) -> U32x8 {
    let c = 2u * lane + first * w;
    return U32x8(
        c, c + 1u, c + 2u * w, c + 2u * w + 1u,
        c + 4u * w, c + 4u * w + 1u, c + 6u * w, c + 6u * w + 1u,
    );
}

// x of a pair of slots holding vectors j0 (even) and j1 = j0 + 1 of the row
// at base4; the pair is live or dead as a whole.
fn slots_x4(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool) -> Vec4x2 {
    if (l0) {
        return load_x8((base4 + j0) >> 1u);
    }
    return Vec4x2(vec4<f32>(0.0), vec4<f32>(0.0));
}

// Stores y0 and y1 of a live pair of slots as one access.
fn slots_store_y4(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool, y0: vec4<f32>, y1: vec4<f32>) {
    if (l0) {
        store_y8((base4 + j0) >> 1u, y0, y1);
    }
}
