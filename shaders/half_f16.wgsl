// IEEE binary16 as the half type of io_half.wgsl and io_half_pairs.wgsl:
// two per u32 word, element 2k in the low half. Loads unpack with
// unpack2x16float (no shader feature needed); stores round by hand
// (f16_bits4, half_convert.wgsl), because pack2x16float's result is
// undefined outside the f16 range and its rounding is not guaranteed.

fn unpack_half2(w: u32) -> vec2<f32> {
    return unpack2x16float(w);
}

fn pack_half4(v: vec4<f32>) -> vec2<u32> {
    return pack_f16x4(v);
}

fn half_bits(v: f32) -> u32 {
    return f16_bits(v);
}
