// Storage of x and y as plain f32 arrays.
@group(0) @binding(1) var<storage, read> x_buf: array<f32>;
@group(0) @binding(2) var<storage, read_write> y_buf: array<f32>;

fn load_x(i: u32) -> f32 {
    return x_buf[i];
}

fn store_y(i: u32, v: f32) {
    y_buf[i] = v;
}
