// Backward storage of x, grad_output and grad_input as f32, bound as
// vec4<f32> (bindings are padded to 16 bytes): scalar access picks a
// component, and aligned groups of four move as one vector. Every element
// is its own word, so any invocation may write any element.
// Indices are the tensor's; local()/local4() (backward_common.wgsl) make
// them the bound chunk's when the tensor is split (BWD_CHUNKED).
@group(0) @binding(1) var<storage, read> x_buf: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dy_buf: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dx_buf: array<vec4<f32>>;

// Elements of grad_input one store_dx writes.
const BWD_PACK: u32 = 1u;

fn load_x(at: u32) -> f32 {
    let i = local(at);
    return x_buf[i >> 2u][i & 3u];
}

fn load_dy(at: u32) -> f32 {
    let i = local(at);
    return dy_buf[i >> 2u][i & 3u];
}

// Elements 4·i4 .. 4·i4 + 3.
fn load_x4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    return x_buf[i4];
}

fn load_dy4(at4: u32) -> vec4<f32> {
    let i4 = local4(at4);
    return dy_buf[i4];
}

// Writes grad_input[i] (`v1` and `second` only matter for packed storage).
fn store_dx(at: u32, v0: f32, v1: f32, second: bool) {
    let i = local(at);
    dx_buf[i >> 2u][i & 3u] = v0;
}

// Writes grad_input 4·i4 .. 4·i4 + 3.
fn store_dx4(at4: u32, v: vec4<f32>) {
    let i4 = local4(at4);
    dx_buf[i4] = v;
}
