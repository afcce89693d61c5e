// Half-precision x and y (the half file before it: half_f16.wgsl or
// half_bf16.wgsl) bound as vec4<u32>, eight elements per access, for the
// held kernels with paired slots (PAIRED_ACCESS, held_slots.wgsl): a lane
// loads and stores two adjacent vectors at once.
//
// Why: lavapipe turns every storage access into a loop over the SIMD lanes
// with a bounds check per lane, so its cost follows the count of accesses,
// not bytes. With io_half.wgsl an access moves 8 bytes, half of what the
// copy kernel's vec4<f32> moves; pairs move 16. Measured (time over the
// copy kernel's, medians of 6 alternated runs): LayerNorm f16 rows of 256
// 2.46 to 2.27; Keras BatchNorm f16 train 32x56x56x64 3.54 to 3.06. On a
// GPU 16-byte accesses per lane coalesce at least as well as 8-byte ones.
//
// The other io functions stay for common.wgsl and work at any index, at
// the cost of partial accesses; the paired kernels do not call them on hot
// paths. Invariant: one invocation writes both halves of a word.
@group(0) @binding(1) var<storage, read> x_buf: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y_buf: array<vec4<u32>>;

const HALF_STORAGE: bool = true;

// One access moves two vectors (held_slots.wgsl lays its slots in pairs).
const PAIRED_ACCESS: bool = true;

fn x_word(k: u32) -> u32 {
    return x_buf[k >> 2u][k & 3u];
}

fn load_x(i: u32) -> f32 {
    return unpack_half2(x_word(i >> 1u))[i & 1u];
}

// Elements 4·i4 .. 4·i4 + 3: words 2·i4 and 2·i4 + 1.
fn load_x4(i4: u32) -> vec4<f32> {
    return vec4<f32>(unpack_half2(x_word(2u * i4)), unpack_half2(x_word(2u * i4 + 1u)));
}

// Elements 8·i8 .. 8·i8 + 7, as two vectors.
fn load_x8(i8: u32) -> array<vec4<f32>, 2> {
    let w = x_buf[i8];
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack_half2(w.x), unpack_half2(w.y)),
        vec4<f32>(unpack_half2(w.z), unpack_half2(w.w)),
    );
}

fn store_y4(i4: u32, v: vec4<f32>) {
    let w = pack_half4(v);
    let c = (i4 & 1u) * 2u;
    y_buf[i4 >> 1u][c] = w.x;
    y_buf[i4 >> 1u][c + 1u] = w.y;
}

// Writes elements 8·i8 .. 8·i8 + 7: a, then b.
fn store_y8(i8: u32, a: vec4<f32>, b: vec4<f32>) {
    y_buf[i8] = vec4<u32>(pack_half4(a), pack_half4(b));
}

// Writes y[i] and y[i + 1] (i even) as one word; without `second` the high
// half is padding and written as zero.
fn store_y2(i: u32, v0: f32, v1: f32, second: bool) {
    var hi = 0u;
    if (second) {
        hi = half_bits(v1);
    }
    y_buf[i >> 3u][(i >> 1u) & 3u] = half_bits(v0) | (hi << 16u);
}
