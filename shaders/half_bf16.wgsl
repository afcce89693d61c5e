// bfloat16 (the top half of an f32) as the half type of io_half.wgsl and
// io_half_pairs.wgsl: two per u32 word, element 2k in the low half. Loads
// shift into place exactly; stores round by hand (bf16_bits4,
// half_convert.wgsl).

fn unpack_half2(w: u32) -> vec2<f32> {
    return bf16_pair(w);
}

fn pack_half4(v: vec4<f32>) -> vec2<u32> {
    return pack_bf16x4(v);
}

fn half_bits(v: f32) -> u32 {
    return bf16_bits(v);
}
