// Backward half-precision storage (the half file before it: half_f16.wgsl
// or half_bf16.wgsl) bound as vec4<u32>, eight elements per access, for the
// held-row backward with paired slots (PAIRED_ACCESS, held_slots.wgsl) and
// the subgroup row and run kernels on rows and runs of whole pairs, as
// io_half_pairs.wgsl is for the forward: lavapipe's cost follows the count
// of accesses, and pairs halve it for x, grad_output and grad_input.
// The other io functions stay for the module's other kernels and work at
// any index, at the cost of partial accesses; they do not run on the
// paired kernels' hot paths. Invariant: one invocation writes both halves of
// a word. Indices are the tensor's; local()/local4() (backward_common.wgsl)
// make them the bound chunk's (chunks start at multiples of 256 elements,
// so at whole pairs).
@group(0) @binding(1) var<storage, read> x_buf: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> dy_buf: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> dx_buf: array<vec4<u32>>;

// Elements of grad_input one store_dx writes (one word).
const BWD_PACK: u32 = 2u;

// One access moves two vectors (held_slots.wgsl lays its slots in pairs).
const PAIRED_ACCESS: bool = true;

fn load_x(at: u32) -> f32 {
    let i = local(at);
    return unpack_half2(x_buf[i >> 3u][(i >> 1u) & 3u])[i & 1u];
}

fn load_dy(at: u32) -> f32 {
    let i = local(at);
    return unpack_half2(dy_buf[i >> 3u][(i >> 1u) & 3u])[i & 1u];
}

// Elements 4·i4 .. 4·i4 + 3: words 2·i4 and 2·i4 + 1.
fn load_x4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    let c = (i4 & 1u) * 2u;
    return vec4<f32>(unpack_half2(x_buf[i4 >> 1u][c]), unpack_half2(x_buf[i4 >> 1u][c + 1u]));
}

fn load_dy4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    let c = (i4 & 1u) * 2u;
    return vec4<f32>(unpack_half2(dy_buf[i4 >> 1u][c]), unpack_half2(dy_buf[i4 >> 1u][c + 1u]));
}

fn halves8(w: vec4<u32>) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack_half2(w.x), unpack_half2(w.y)),
        vec4<f32>(unpack_half2(w.z), unpack_half2(w.w)),
    );
}

// Elements 8·i8 .. 8·i8 + 7, as two vectors, in one access.
fn load_x8(at8: u32) -> array<vec4<f32>, 2> {
    return halves8(x_buf[local4(2u * at8) >> 1u]);
}

fn load_dy8(at8: u32) -> array<vec4<f32>, 2> {
    return halves8(dy_buf[local4(2u * at8) >> 1u]);
}

// Writes grad_input[i] and grad_input[i + 1] (i even) as one word; without
// `second` (i is the last element) the high half is padding, written as 0.
fn store_dx(at: u32, v0: f32, v1: f32, second: bool) {
    let i = local(at);
    var hi = 0u;
    if (second) {
        hi = half_bits(v1);
    }
    dx_buf[i >> 3u][(i >> 1u) & 3u] = half_bits(v0) | (hi << 16u);
}

fn store_dx4(at4: u32, v: vec4<f32>) {
    let i4 = local4(at4);
    let w = pack_half4(v);
    let c = (i4 & 1u) * 2u;
    dx_buf[i4 >> 1u][c] = w.x;
    dx_buf[i4 >> 1u][c + 1u] = w.y;
}

// Writes grad_input 8·i8 .. 8·i8 + 7 (a, then b) in one access.
fn store_dx8(at8: u32, a: vec4<f32>, b: vec4<f32>) {
    dx_buf[local4(2u * at8) >> 1u] = vec4<u32>(pack_half4(a), pack_half4(b));
}
