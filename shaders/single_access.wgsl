// The eight-element accesses of the forward io files that move one vector
// per access (io_f32.wgsl, io_half.wgsl): two accesses each.
// io_half_pairs.wgsl has its own, of one access.

const PAIRED_ACCESS: bool = false;

fn load_x8(i8: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(load_x4(2u * i8), load_x4(2u * i8 + 1u));
}

fn store_y8(i8: u32, a: vec4<f32>, b: vec4<f32>) {
    store_y4(2u * i8, a);
    store_y4(2u * i8 + 1u, b);
}
