// Backward storage of x, grad_output and grad_input in half precision, two
// per u32 word (element 2k in the low half), in the format of the half file
// before it (half_f16.wgsl or half_bf16.wgsl: unpack_half2, pack_half4,
// half_bits), bound as vec2<u32> (four elements; bindings are padded to 16
// bytes). Stores round once: nearest even, overflow to ±inf, NaN kept.
// Invariant: one invocation writes both halves of a word — callers store
// pairs starting at even indices (BWD_PACK = 2), so no two invocations race
// on a word.
// Indices are the tensor's; local()/local4() (backward_common.wgsl) make
// them the bound chunk's when the tensor is split (BWD_CHUNKED).
@group(0) @binding(1) var<storage, read> x_buf: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> dy_buf: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read_write> dx_buf: array<vec2<u32>>;

// Elements of grad_input one store_dx writes (one word).
const BWD_PACK: u32 = 2u;

fn load_x(at: u32) -> f32 {
    let i = local(at);
    return unpack_half2(x_buf[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}

fn load_dy(at: u32) -> f32 {
    let i = local(at);
    return unpack_half2(dy_buf[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}

// Elements 4·i4 .. 4·i4 + 3.
fn load_x4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    let w = x_buf[i4];
    return vec4<f32>(unpack_half2(w.x), unpack_half2(w.y));
}

fn load_dy4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    let w = dy_buf[i4];
    return vec4<f32>(unpack_half2(w.x), unpack_half2(w.y));
}

// Writes grad_input[i] and grad_input[i + 1] (i even) as one word; without
// `second` (i is the last element) the high half is padding, written as 0.
fn store_dx(at: u32, v0: f32, v1: f32, second: bool) {
    let i = local(at);
    var hi = 0u;
    if (second) {
        hi = half_bits(v1);
    }
    dx_buf[i >> 2u][(i >> 1u) & 1u] = half_bits(v0) | (hi << 16u);
}

// Writes grad_input 4·i4 .. 4·i4 + 3 (two whole words).
fn store_dx4(at4: u32, v: vec4<f32>) {
    let i4 = local4(at4);
    dx_buf[i4] = pack_half4(v);
}
