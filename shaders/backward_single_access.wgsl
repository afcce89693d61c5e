// The eight-element accesses of the backward io files that move one vector
// per access (backward_io_f32.wgsl, backward_io_half.wgsl): two accesses
// each. backward_io_half_pairs.wgsl has its own, of one access.

const PAIRED_ACCESS: bool = false;

fn load_x8(at8: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(load_x4(2u * at8), load_x4(2u * at8 + 1u));
}

fn load_dy8(at8: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(load_dy4(2u * at8), load_dy4(2u * at8 + 1u));
}

fn store_dx8(at8: u32, a: vec4<f32>, b: vec4<f32>) {
    store_dx4(2u * at8, a);
    store_dx4(2u * at8 + 1u, b);
}
