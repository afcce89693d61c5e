// Backward storage of x, grad_output and grad_input as bfloat16, two per
// u32 word (element 2k in the low half). Loads shift into place
// (bf16_pair); stores round once with bf16_bits (half_convert.wgsl):
// nearest even, overflow to ±inf, NaN kept.
// Invariant: one invocation writes both halves of a word — callers store
// pairs starting at even indices (BWD_PACK = 2), so no two invocations race
// on a word. Bindings are padded to 16 bytes, so whole words are in range.
@group(0) @binding(1) var<storage, read> x_buf: array<u32>;
@group(0) @binding(2) var<storage, read> dy_buf: array<u32>;
@group(0) @binding(5) var<storage, read_write> dx_buf: array<u32>;

// Elements of grad_input one store writes (one word).
const BWD_PACK: u32 = 2u;

fn load_x(i: u32) -> f32 {
    return bf16_pair(x_buf[i >> 1u])[i & 1u];
}

fn load_dy(i: u32) -> f32 {
    return bf16_pair(dy_buf[i >> 1u])[i & 1u];
}

// Writes grad_input[i] and grad_input[i + 1] (i even) as one word; without
// `second` (i is the last element) the high half is padding, written as 0.
fn store_dx(i: u32, v0: f32, v1: f32, second: bool) {
    var hi = 0u;
    if (second) {
        hi = bf16_bits(v1);
    }
    dx_buf[i >> 1u] = bf16_bits(v0) | (hi << 16u);
}
