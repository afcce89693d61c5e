// Backward storage of x, grad_output and grad_input as IEEE binary16, two
// per u32 word (element 2k in the low half), bound as vec2<u32> (four
// elements; bindings are padded to 16 bytes). Loads unpack with
// unpack2x16float (no shader feature needed); stores round once with
// f16_bits (half_convert.wgsl): nearest even, overflow to ±inf, NaN kept.
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
    return unpack2x16float(x_buf[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}

fn load_dy(at: u32) -> f32 {
    let i = local(at);
    return unpack2x16float(dy_buf[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}

// Elements 4·i4 .. 4·i4 + 3.
fn load_x4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    let w = x_buf[i4];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn load_dy4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    let w = dy_buf[i4];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

// Writes grad_input[i] and grad_input[i + 1] (i even) as one word; without
// `second` (i is the last element) the high half is padding, written as 0.
fn store_dx(at: u32, v0: f32, v1: f32, second: bool) {
    let i = local(at);
    var hi = 0u;
    if (second) {
        hi = f16_bits(v1);
    }
    dx_buf[i >> 2u][(i >> 1u) & 1u] = f16_bits(v0) | (hi << 16u);
}

// Writes grad_input 4·i4 .. 4·i4 + 3 (two whole words).
fn store_dx4(at4: u32, v: vec4<f32>) {
    let i4 = local4(at4);
    dx_buf[i4] = pack_f16x4(v);
}
