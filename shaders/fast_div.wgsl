// Exact u32 division by a divisor fixed for a dispatch, as multiply-high
// and shifts: integer division is a scalar loop on CPUs that run WGSL
// (lavapipe) and slow on many GPUs. The host prepares each divisor d as
// vec4(d, m, s1, s2) with engine::fast_divisor; prepended to the forward
// and the backward kernels alike.

// High 32 bits of the 64-bit product a·b.
fn mul_hi(a: u32, b: u32) -> u32 {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let lo = a0 * b0;
    let mid1 = a1 * b0;
    let mid2 = a0 * b1;
    let carry = ((lo >> 16u) + (mid1 & 0xffffu) + (mid2 & 0xffffu)) >> 16u;
    return a1 * b1 + (mid1 >> 16u) + (mid2 >> 16u) + carry;
}

// n / d for a divisor prepared on the host as (d, m, s1, s2) (Granlund and
// Montgomery's round-up method; exact for every u32 n and d >= 1).
fn fast_div(n: u32, f: vec4<u32>) -> u32 {
    let t = mul_hi(n, f.y);
    return (t + ((n - t) >> f.z)) >> f.w;
}
