// Rows held in registers by the held-row kernels (rows_held.wgsl forward,
// backward_rows_held.wgsl; on GPUs their workgroup twins,
// rows_workgroup_held.wgsl and backward_rows_workgroup_held.wgsl, with w
// the workgroup size; channels-last columns, columns_held.wgsl and
// backward_channels_held.wgsl): a lane of a `w`-wide subgroup holds its
// share of a row's vectors in up to 32 slots, four octets of eight.
// Octets are arrays of eight values passed by value and indexed only with
// constants, so they stay in registers: lavapipe kept an array indexed in a
// loop in memory and ran 14% slower. HELD_K (an override, declared with
// the kernels' other pipeline constants) is the number of slots in use;
// slots past it fold away. A slot whose vector lies past the row (j4 ≥ n4)
// is dead: it loads zeros and stores nothing.
//
// Which vectors a lane's slots hold depends on the io file's access width
// (PAIRED_ACCESS). Singly, slot k of lane l holds vector l + k·w, so the w
// lanes read w consecutive vectors per slot; any row of whole vectors fits.
// In pairs (half storage bound as vec4<u32>, rows of an even count of
// vectors n4, HELD_K even: engine::held_layout), slots 2q and 2q + 1 hold
// the adjacent vectors 2·(l + q·w) and 2·(l + q·w) + 1, moved by one
// 16-byte access, which halves lavapipe's lane loops for half storage; a
// row then starts at a whole pair, and a pair is live or dead as a whole.
alias Vec4x8 = array<vec4<f32>, 8>;
alias Vec4x2 = array<vec4<f32>, 2>;
alias U32x8 = array<u32, 8>;
alias Livex8 = array<bool, 8>;

// The vectors of slots first .. first + 7 (first a multiple of 8) of a lane
// of a `w`-wide subgroup.
fn octet_columns(lane: u32, w: u32, first: u32) -> U32x8 {
    if (PAIRED_ACCESS) {
        let c = 2u * lane + first * w;
        return U32x8(
            c, c + 1u, c + 2u * w, c + 2u * w + 1u,
            c + 4u * w, c + 4u * w + 1u, c + 6u * w, c + 6u * w + 1u,
        );
    }
    let c = lane + first * w;
    return U32x8(c, c + w, c + 2u * w, c + 3u * w, c + 4u * w, c + 5u * w, c + 6u * w, c + 7u * w);
}

fn slot_live(k: u32, j4: u32, n4: u32) -> bool {
    return k < HELD_K && j4 < n4;
}

fn octet_live(j: U32x8, first: u32, n4: u32) -> Livex8 {
    return Livex8(
        slot_live(first, j[0], n4), slot_live(first + 1u, j[1], n4),
        slot_live(first + 2u, j[2], n4), slot_live(first + 3u, j[3], n4),
        slot_live(first + 4u, j[4], n4), slot_live(first + 5u, j[5], n4),
        slot_live(first + 6u, j[6], n4), slot_live(first + 7u, j[7], n4),
    );
}

// A lane's four octets: their vectors and which are live in rows of n4.
struct HeldSlots {
    j0: U32x8,
    j1: U32x8,
    j2: U32x8,
    j3: U32x8,
    l0: Livex8,
    l1: Livex8,
    l2: Livex8,
    l3: Livex8,
}

fn held_slots(lane: u32, w: u32, n4: u32) -> HeldSlots {
    let j0 = octet_columns(lane, w, 0u);
    let j1 = octet_columns(lane, w, 8u);
    let j2 = octet_columns(lane, w, 16u);
    let j3 = octet_columns(lane, w, 24u);
    return HeldSlots(
        j0, j1, j2, j3,
        octet_live(j0, 0u, n4), octet_live(j1, 8u, n4), octet_live(j2, 16u, n4), octet_live(j3, 24u, n4),
    );
}

fn slot_x4(base4: u32, j4: u32, live: bool) -> vec4<f32> {
    if (live) {
        return load_x4(base4 + j4);
    }
    return vec4<f32>(0.0);
}

// x of two consecutive slots (vectors j0 and j1 of the row at base4; in
// pairs j1 = j0 + 1, j0 even, and l1 = l0), zeros where dead.
fn slots_x4(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool) -> Vec4x2 {
    if (PAIRED_ACCESS) {
        if (l0) {
            return load_x8((base4 + j0) >> 1u);
        }
        return Vec4x2(vec4<f32>(0.0), vec4<f32>(0.0));
    }
    return Vec4x2(slot_x4(base4, j0, l0), slot_x4(base4, j1, l1));
}

// x of an octet's slots in the row starting at vector base4.
fn octet_x4(base4: u32, j: U32x8, l: Livex8) -> Vec4x8 {
    let p0 = slots_x4(base4, j[0], j[1], l[0], l[1]);
    let p1 = slots_x4(base4, j[2], j[3], l[2], l[3]);
    let p2 = slots_x4(base4, j[4], j[5], l[4], l[5]);
    let p3 = slots_x4(base4, j[6], j[7], l[6], l[7]);
    return Vec4x8(p0[0], p0[1], p1[0], p1[1], p2[0], p2[1], p3[0], p3[1]);
}

// v − m0 for a live slot, 0 for the others (they add nothing to the sums).
fn slot_centered(v: vec4<f32>, m0: f32, live: bool) -> vec4<f32> {
    return select(vec4<f32>(0.0), v - m0, live);
}

fn octet_centered(v: Vec4x8, m0: f32, l: Livex8) -> Vec4x8 {
    return Vec4x8(
        slot_centered(v[0], m0, l[0]), slot_centered(v[1], m0, l[1]),
        slot_centered(v[2], m0, l[2]), slot_centered(v[3], m0, l[3]),
        slot_centered(v[4], m0, l[4]), slot_centered(v[5], m0, l[5]),
        slot_centered(v[6], m0, l[6]), slot_centered(v[7], m0, l[7]),
    );
}

fn octet_sum(v: Vec4x8) -> vec4<f32> {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Σ a·b over the octet, per component.
fn octet_dot(a: Vec4x8, b: Vec4x8) -> vec4<f32> {
    return ((a[0] * b[0] + a[1] * b[1]) + (a[2] * b[2] + a[3] * b[3]))
        + ((a[4] * b[4] + a[5] * b[5]) + (a[6] * b[6] + a[7] * b[7]));
}

fn octet_add(a: Vec4x8, b: Vec4x8) -> Vec4x8 {
    return Vec4x8(a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5], a[6] + b[6], a[7] + b[7]);
}

fn octet_mul(a: Vec4x8, b: Vec4x8) -> Vec4x8 {
    return Vec4x8(a[0] * b[0], a[1] * b[1], a[2] * b[2], a[3] * b[3], a[4] * b[4], a[5] * b[5], a[6] * b[6], a[7] * b[7]);
}

fn octet_sub(a: Vec4x8, b: Vec4x8) -> Vec4x8 {
    return Vec4x8(a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3], a[4] - b[4], a[5] - b[5], a[6] - b[6], a[7] - b[7]);
}

// Σd and Σd² of d = v − m0 over an octet's live slots, in the order of
// octet_sum and octet_dot. The held kernels keep v to their store and take
// v − m0 again there (the same bits): keeping d from the sums to the store
// instead was 4% slower on lavapipe (LayerNorm 4096x1024, rows_held).
struct CenteredSums {
    s: vec4<f32>,
    q: vec4<f32>,
}

fn octet_centered_sums(v: Vec4x8, m0: f32, l: Livex8) -> CenteredSums {
    let d = octet_centered(v, m0, l);
    return CenteredSums(octet_sum(d), octet_dot(d, d));
}
