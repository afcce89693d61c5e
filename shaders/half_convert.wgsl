// f32 <-> f16/bf16 conversions shared by the forward (io_f16.wgsl,
// io_bf16.wgsl) and the backward (backward_io_*.wgsl): prepended to every
// kernel by src/kernels.rs and src/backward.rs, so there is one copy.
// Stores are written by hand, not with pack2x16float (its result outside
// the f16 range is undefined and its rounding is not guaranteed). f16 loads
// use unpack2x16float directly.

// The two bf16 halves of a word (element 2k in the low half) as f32, exactly.
fn bf16_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
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

// f32 -> bf16 bits: round to nearest even (overflow carries into ±inf),
// NaN stays NaN (quieted).
fn bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return ((b >> 16u) | 0x0040u) & 0xffffu;
    }
    return ((b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u) & 0xffffu;
}
