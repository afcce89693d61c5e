// f32 <-> f16/bf16 conversions shared by the forward (half_f16.wgsl,
// half_bf16.wgsl for io_half.wgsl and io_half_pairs.wgsl) and the backward
// (backward_io_*.wgsl): prepended to every kernel by src/kernels.rs and
// src/backward.rs, so there is one copy.
// Stores are written by hand, not with pack2x16float (its result outside
// the f16 range is undefined and its rounding is not guaranteed). f16 loads
// use unpack2x16float directly.

// The two bf16 halves of a word (element 2k in the low half) as f32, exactly.
fn bf16_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// f32 -> f16 bits of four values: round to nearest even, overflow to ±inf,
// NaN stays NaN. Branch-free (every case computed, one selected), so CPUs
// that run WGSL keep the four lanes in vector registers: with a branch per
// value lavapipe masked and ran each case lane by lane.
fn f16_bits4(v: vec4<f32>) -> vec4<u32> {
    let b = bitcast<vec4<u32>>(v);
    let sign = (b >> vec4<u32>(16u)) & vec4<u32>(0x8000u);
    let a = b & vec4<u32>(0x7fffffffu);
    // Normal: rebias the exponent (127 -> 15) and drop 13 mantissa bits
    // (wraps for values below the normal range, which select() discards).
    let m = a - vec4<u32>(0x38000000u);
    var r = (m + vec4<u32>(0xfffu) + ((m >> vec4<u32>(13u)) & vec4<u32>(1u))) >> vec4<u32>(13u);
    // Below 2^-14: an f16 subnormal, i.e. round(|v| / 2^-24) (round is
    // ties-to-even in WGSL; scaling by 2^24 is exact). Larger values, inf
    // and NaN are clamped to 2^-14 first (on the bits), so the conversion
    // always sees a small finite value; select() discards them.
    let small = bitcast<vec4<f32>>(min(a, vec4<u32>(0x38800000u)));
    let subnormal = vec4<u32>(round(small * 16777216.0));
    r = select(r, subnormal, a < vec4<u32>(0x38800000u));
    // 65520 (0x477ff000) is halfway between 65504 and 65536: ties to even is inf.
    r = select(r, vec4<u32>(0x7c00u), a >= vec4<u32>(0x477ff000u));
    r = select(r, vec4<u32>(0x7e00u), a > vec4<u32>(0x7f800000u));
    return sign | r;
}

// f16_bits4 of one value.
fn f16_bits(v: f32) -> u32 {
    return f16_bits4(vec4<f32>(v)).x;
}

// f32 -> bf16 bits of four values: round to nearest even (overflow carries
// into ±inf), NaN stays NaN (quieted). Branch-free, as f16_bits4.
fn bf16_bits4(v: vec4<f32>) -> vec4<u32> {
    let b = bitcast<vec4<u32>>(v);
    let nan = ((b >> vec4<u32>(16u)) | vec4<u32>(0x0040u)) & vec4<u32>(0xffffu);
    let rounded = ((b + vec4<u32>(0x7fffu) + ((b >> vec4<u32>(16u)) & vec4<u32>(1u))) >> vec4<u32>(16u)) & vec4<u32>(0xffffu);
    return select(rounded, nan, (b & vec4<u32>(0x7fffffffu)) > vec4<u32>(0x7f800000u));
}

// bf16_bits4 of one value.
fn bf16_bits(v: f32) -> u32 {
    return bf16_bits4(vec4<f32>(v)).x;
}

// Four values as two words of halves (element 2k in the low half).
fn pack_f16x4(v: vec4<f32>) -> vec2<u32> {
    let h = f16_bits4(v);
    return vec2<u32>(h.x | (h.y << 16u), h.z | (h.w << 16u));
}

fn pack_bf16x4(v: vec4<f32>) -> vec2<u32> {
    let h = bf16_bits4(v);
    return vec2<u32>(h.x | (h.y << 16u), h.z | (h.w << 16u));
}
