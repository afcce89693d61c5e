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

// Element j of a group laid out as runs of `len` elements: run `run`, at
// offset `off` in it. A loop that walks a group with a fixed stride moves
// the position with run_step instead of dividing every index: fast_div's
// multiply-high is about a dozen operations per lane on lavapipe, a
// quarter of BatchNorm's backward partials.
struct RunPos {
    run: u32,
    off: u32,
}

// The position of element j for runs of div_len.x elements (a divisor
// prepared for fast_div). Also a stride: whole runs and the remainder.
fn run_pos(j: u32, div_len: vec4<u32>) -> RunPos {
    let run = fast_div(j, div_len);
    return RunPos(run, j - run * div_len.x);
}

// The position `stride` further, for a stride given as run_pos(step) with
// the same runs of `len` elements: exact for any step and length.
fn run_step(pos: RunPos, stride: RunPos, len: u32) -> RunPos {
    let off = pos.off + stride.off;
    let wrap = off >= len;
    return RunPos(pos.run + stride.run + select(0u, 1u, wrap), select(off, off - len, wrap));
}
