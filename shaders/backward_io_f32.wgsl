// Backward storage of x, grad_output and grad_input as f32 (one element per
// array entry; every element is its own word, so any invocation may write
// any element).
@group(0) @binding(1) var<storage, read> x_buf: array<f32>;
@group(0) @binding(2) var<storage, read> dy_buf: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx_buf: array<f32>;

// Elements of grad_input one store writes (see store_dx).
const BWD_PACK: u32 = 1u;

fn load_x(i: u32) -> f32 {
    return x_buf[i];
}

fn load_dy(i: u32) -> f32 {
    return dy_buf[i];
}

// Writes grad_input[i] (`v1` and `second` only matter for packed storage).
fn store_dx(i: u32, v0: f32, v1: f32, second: bool) {
    dx_buf[i] = v0;
}
