// Storage of x and y as IEEE binary16, two per u32 word (element 2k in the
// low half). No shader feature is needed: loads unpack with
// unpack2x16float; stores round by hand, because pack2x16float's result is
// undefined outside the f16 range and its rounding is not guaranteed.
// Invariant: one invocation writes both halves of a word (callers store
// pairs starting at even indices), so no two invocations race on a word.
// Bound as vec2<u32> (four halves; bindings are padded to 16 bytes).
@group(0) @binding(1) var<storage, read> x_buf: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> y_buf: array<vec2<u32>>;

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
    y_buf[i4] = vec2<u32>(f16_bits(v.x) | (f16_bits(v.y) << 16u), f16_bits(v.z) | (f16_bits(v.w) << 16u));
}

// f32 -> f16 bits: round to nearest even, overflow to ±inf, NaN stays NaN.
fn f16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u;
    }
    // 65520 (0x477ff000) is halfway between 65504 and 65536: ties to even is inf.
    if (a >= 0x477ff000u) {
        return sign | 0x7c00u;
    }
    if (a < 0x38800000u) {
        // Below 2^-14: an f16 subnormal, i.e. round(|v| / 2^-24) (round is
        // ties-to-even in WGSL; scaling by 2^24 is exact).
        return sign | u32(round(bitcast<f32>(a) * 16777216.0));
    }
    // Normal: rebias the exponent (127 -> 15) and drop 13 mantissa bits.
    let m = a - 0x38000000u;
    return sign | ((m + 0xfffu + ((m >> 13u) & 1u)) >> 13u);
}

// Writes y[i] and y[i + 1] (i even) as one word; without `second` the high
// half is padding and written as zero.
fn store_y2(i: u32, v0: f32, v1: f32, second: bool) {
    var hi = 0u;
    if (second) {
        hi = f16_bits(v1);
    }
    y_buf[i >> 2u][(i >> 1u) & 1u] = f16_bits(v0) | (hi << 16u);
}
