// Compensated sums (Neumaier's variant of Kahan's), for the statistics'
// accumulators: a lane that adds thousands of terms one by one into an f32
// loses about sqrt(n/3) roundings of its total, which puts f16 outputs near
// zero several ulps off (SPEC §6's floor is 2 ulps of 2^-24 there). The hot
// loops add into a plain block sum for a few steps and fold each block
// into a compensated total, so the compensation costs a few operations per
// block, not per element.
//
// The value is sum + carry. Compilers may reassociate float arithmetic
// (SPIR-V does not forbid it, and lavapipe folds TwoSum's (a + b) − a to b,
// leaving no carry), so every error-free step passes its rounded result
// through `opaque`, which no compiler can see through: an xor with a value
// known only when the kernel runs. The unit test
// compensated_arithmetic_keeps_its_low_parts_on_the_device (src/kernels.rs)
// fails if a carry is folded away.

// Steps of a lane's loop added into a plain block sum before the block is
// folded into the compensated total.
const COMPENSATED_BLOCK: u32 = 16u;

// v, but not a value the compiler can simplify expressions through.
// opaque_zero() (common.wgsl, backward_common.wgsl) is zero at run time
// and unknown when compiling.
fn opaque(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) ^ opaque_zero());
}

fn opaque4(v: vec4<f32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(bitcast<vec4<u32>>(v) ^ vec4<u32>(opaque_zero()));
}

// Neither infinite nor NaN, tested on the bits: a compiler may assume that
// float comparisons never meet an inf or a NaN.
fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) < 0x7f800000u;
}

fn is_finite4(v: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu)) < vec4<u32>(0x7f800000u);
}

struct Compensated {
    sum: f32,
    carry: f32,
}

fn add_compensated(a: Compensated, v: f32) -> Compensated {
    let t = opaque(a.sum + v);
    let lost = select((v - t) + a.sum, (a.sum - t) + v, abs(a.sum) >= abs(v));
    return Compensated(t, a.carry + lost);
}

// The total; an infinite or NaN sum is the answer alone (its carry is NaN).
fn compensated_total(a: Compensated) -> f32 {
    return select(a.sum, a.sum + a.carry, is_finite(a.sum));
}

struct Compensated4 {
    sum: vec4<f32>,
    carry: vec4<f32>,
}

// sum + v, the rounding error of the addition kept in the carry.
fn add_compensated4(a: Compensated4, v: vec4<f32>) -> Compensated4 {
    let t = opaque4(a.sum + v);
    let lost = select((v - t) + a.sum, (a.sum - t) + v, abs(a.sum) >= abs(v));
    return Compensated4(t, a.carry + lost);
}

// The total. Where the sum is infinite or NaN the carry is NaN (inf − inf)
// and the sum alone is the answer: an inf among the values keeps the
// infinite mean that torch's has.
fn compensated_total4(a: Compensated4) -> vec4<f32> {
    return select(a.sum, a.sum + a.carry, is_finite4(a.sum));
}

// a + b as (sum, exact rounding error): Knuth's TwoSum, for any order of
// magnitude of the two.
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = opaque(a + b);
    let bb = opaque(s - a);
    return vec2<f32>(s, (a - (s - bb)) + (b - bb));
}

// The high half of a's 24 significant bits (Veltkamp's split by 2^12 + 1);
// a − split_high(a) is the low half, and a product of two halves is exact.
fn split_high(a: f32) -> f32 {
    let c = opaque(4097.0 * a);
    return c - opaque(c - a);
}

// a·b as (product, exact rounding error): Dekker's TwoProduct. Not fma's
// low part: lavapipe does not fuse fma (it multiplies, rounds, adds).
// Overflows for |a|, |b| beyond about 2^115 (the low part is then not
// finite).
fn two_product(a: f32, b: f32) -> vec2<f32> {
    let p = opaque(a * b);
    let ah = split_high(a);
    let bh = split_high(b);
    let al = a - ah;
    let bl = b - bh;
    return vec2<f32>(p, (((ah * bh - p) + ah * bl) + al * bh) + al * bl);
}

// 1/sqrt(v) to about half an ulp: one Newton step on the quotient, whose
// residual 1 − v·r² is taken exactly. lavapipe's own 1/sqrt(v) was up to
// 1.4 ulps off (refined_rsqrt_rounds_to_nearest in src/kernels.rs), which
// moves f16 outputs near zero by about 1.4·|β| of their ulps. Where the
// step is not finite (v = 0, inf or NaN) the plain quotient stands.
fn refined_rsqrt(v: f32) -> f32 {
    let r = 1.0 / sqrt(v);
    let r2 = two_product(r, r);
    let q = two_product(v, r2.x);
    let residual = ((1.0 - q.x) - q.y) - v * r2.y;
    let refined = r + r * (0.5 * residual);
    return select(r, refined, is_finite(refined));
}
