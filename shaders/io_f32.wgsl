// Storage of x and y as plain f32 arrays.
@group(0) @binding(1) var<storage, read> x_buf: array<f32>;
@group(0) @binding(2) var<storage, read_write> y_buf: array<f32>;

fn load_x(i: u32) -> f32 {
    return x_buf[i];
}

// Writes y[i] and, when `second`, y[i + 1].
fn store_y2(i: u32, v0: f32, v1: f32, second: bool) {
    y_buf[i] = v0;
    if (second) {
        y_buf[i + 1u] = v1;
    }
}
