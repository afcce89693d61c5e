// Storage of x and y in half precision, two elements per u32 word, in the
// format of the half file before it (half_f16.wgsl or half_bf16.wgsl:
// unpack_half2, pack_half4, half_bits).
// Invariant: one invocation writes both halves of a word (callers store
// pairs starting at even indices), so no two invocations race on a word.
// Bound as vec2<u32> (four halves; bindings are padded to 16 bytes); the
// held-row kernels take io_half_pairs.wgsl instead where rows allow.
@group(0) @binding(1) var<storage, read> x_buf: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> y_buf: array<vec2<u32>>;

// Whether x and y are stored in half precision (rows_subgroup then
// compensates its sums).
const HALF_STORAGE: bool = true;

fn x_word(k: u32) -> u32 {
    return x_buf[k >> 1u][k & 1u];
}

fn load_x(i: u32) -> f32 {
    return unpack_half2(x_word(i >> 1u))[i & 1u];
}

// Elements 4·i4 .. 4·i4 + 3.
fn load_x4(i4: u32) -> vec4<f32> {
    let w = x_buf[i4];
    return vec4<f32>(unpack_half2(w.x), unpack_half2(w.y));
}

// Writes elements 4·i4 .. 4·i4 + 3.
fn store_y4(i4: u32, v: vec4<f32>) {
    y_buf[i4] = pack_half4(v);
}

// Writes y[i] and y[i + 1] (i even) as one word; without `second` the high
// half is padding and written as zero.
fn store_y2(i: u32, v0: f32, v1: f32, second: bool) {
    var hi = 0u;
    if (second) {
        hi = half_bits(v1);
    }
    y_buf[i >> 2u][(i >> 1u) & 1u] = half_bits(v0) | (hi << 16u);
}
