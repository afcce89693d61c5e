// The copy reference of `gpunorm bench` (src/timing.rs): dst = src, one
// vec4<u32> (16 bytes) per load and per store. Its GB/s is the ceiling any
// shader reaches on the adapter, the base of `fraction_of_copy`.
//
// One invocation copies COPY_PER_THREAD vec4s spaced COPY_WG apart, so
// neighbouring invocations touch neighbouring vec4s at every step (coalesced
// on GPUs, one SIMD row on lavapipe), and each invocation does enough work to
// amortize its start-up (NOTES.md: more work per invocation is faster on
// lavapipe).
//
// Bindings: 0 `src` (read), 1 `dst` (read_write), bound with the same length,
// a multiple of 16 bytes. The grid is 2-D when it has more than 65535
// workgroups; surplus invocations do nothing.

override COPY_WG: u32 = 256u;
override COPY_PER_THREAD: u32 = 8u;

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(COPY_WG)
fn copy(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wg.y * groups.x + wg.x;
    let base = block * COPY_WG * COPY_PER_THREAD + lid;
    let n = arrayLength(&src);
    for (var k = 0u; k < COPY_PER_THREAD; k++) {
        let i = base + k * COPY_WG;
        if (i < n) {
            dst[i] = src[i];
        }
    }
}
