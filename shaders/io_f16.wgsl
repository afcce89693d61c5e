// Storage of x and y as IEEE binary16, two per u32 word (element 2k in the
// low half). No shader feature is needed: loads unpack with
// unpack2x16float; stores round by hand, because pack2x16float's result is
// undefined outside the f16 range and its rounding is not guaranteed.
// Invariant: one invocation writes both halves of a word (callers store
// pairs starting at even indices), so no two invocations race on a word.
// Bound as vec2<u32> (four halves; bindings are padded to 16 bytes).
@group(0) @binding(1) var<storage, read> x_buf: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> y_buf: array<vec2<u32>>;

// Whether x and y are stored in half precision (rows_subgroup then
// compensates its sums).
const HALF_STORAGE: bool = true;

fn x_word(k: u32) -> u32 {
    return x_buf[k >> 1u][k & 1u];
}

fn load_x(i: u32) -> f32 {
    return unpack2x16float(x_word(i >> 1u))[i & 1u];
}

fn load_x4(i4: u32) -> vec4<f32> {
    let w = x_buf[i4];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn store_y4(i4: u32, v: vec4<f32>) {
    y_buf[i4] = pack_f16x4(v);
}

// f16_bits is in half_convert.wgsl (shared with the backward).

// Writes y[i] and y[i + 1] (i even) as one word; without `second` the high
// half is padding and written as zero.
fn store_y2(i: u32, v0: f32, v1: f32, second: bool) {
    var hi = 0u;
    if (second) {
        hi = f16_bits(v1);
    }
    y_buf[i >> 2u][(i >> 1u) & 1u] = f16_bits(v0) | (hi << 16u);
}
