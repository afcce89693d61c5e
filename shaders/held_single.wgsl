// The held slots' layout of one vector per access (held_slots.wgsl): slot k
// of lane l holds vector l + k·w of the row, so the w lanes of a subgroup
// read w consecutive vectors per slot. Any row of whole vectors fits it.
// The forward's stores are in held_single_stores.wgsl (the backward, which
// shares these loads, writes its own outputs).

// The vectors of slots first .. first + 7 of a lane of a `w`-wide subgroup.
fn octet_columns(lane: u32, w: u32, first: u32) -> U32x8 {
    let c = lane + first * w;
    return U32x8(c, c + w, c + 2u * w, c + 3u * w, c + 4u * w, c + 5u * w, c + 6u * w, c + 7u * w);
}

fn slot_x4(base4: u32, j4: u32, live: bool) -> vec4<f32> {
    if (live) {
        return load_x4(base4 + j4);
    }
    return vec4<f32>(0.0);
}

// x of two consecutive slots, holding vectors j0 and j1 of the row at base4.
fn slots_x4(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool) -> Vec4x2 {
    return Vec4x2(slot_x4(base4, j0, l0), slot_x4(base4, j1, l1));
}
