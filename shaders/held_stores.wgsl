// The forward held kernels' stores of y in the layout of held_slots.wgsl
// (the backward writes its own outputs).

// Stores y0 and y1 of two consecutive slots (vectors j0 and j1 of the row at
// base4) where live: one access per pair where PAIRED_ACCESS. Kernels pass
// y computed in the call, so two slots' y are live at a time, not an
// octet's.
fn slots_store_y4(base4: u32, j0: u32, j1: u32, l0: bool, l1: bool, y0: vec4<f32>, y1: vec4<f32>) {
    if (PAIRED_ACCESS) {
        if (l0) {
            store_y8((base4 + j0) >> 1u, y0, y1);
        }
        return;
    }
    if (l0) {
        store_y4(base4 + j0, y0);
    }
    if (l1) {
        store_y4(base4 + j1, y1);
    }
}
