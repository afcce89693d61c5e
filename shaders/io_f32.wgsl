// Storage of x and y as f32, bound as vec4<f32> (bindings are padded to 16
// bytes): scalar access picks a component, and aligned groups of four move
// as one vector.
@group(0) @binding(1) var<storage, read> x_buf: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y_buf: array<vec4<f32>>;

// Whether x and y are stored in half precision (rows_subgroup then
// compensates its sums).
const HALF_STORAGE: bool = false;

fn load_x(i: u32) -> f32 {
    return x_buf[i >> 2u][i & 3u];
}

// Elements 4·i4 .. 4·i4 + 3.
fn load_x4(i4: u32) -> vec4<f32> {
    return x_buf[i4];
}

// Writes y[i] and, when `second`, y[i + 1] (any i: f32 rows of odd length
// start at odd indices, and y[i + 1] may be in the next vec4).
fn store_y2(i: u32, v0: f32, v1: f32, second: bool) {
    y_buf[i >> 2u][i & 3u] = v0;
    if (second) {
        let k = i + 1u;
        y_buf[k >> 2u][k & 3u] = v1;
    }
}

// Writes elements 4·i4 .. 4·i4 + 3.
fn store_y4(i4: u32, v: vec4<f32>) {
    y_buf[i4] = v;
}
