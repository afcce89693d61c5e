// The sum over a workgroup of ROWS_WG_HELD invocations, shared by the
// workgroup-held row kernels (rows_workgroup_held.wgsl forward,
// backward_rows_workgroup_held.wgsl). Two stages through workgroup memory:
// a sixteenth of the invocations add sixteen partials each, then every
// invocation adds those sixteen in the same order, so all get the same bits
// and no subgroup operation is needed.
const ROWS_WG_HELD_STAGE: u32 = 16u;

var<workgroup> wg_partials: array<vec4<f32>, ROWS_WG_HELD>;
var<workgroup> wg_stage: array<vec4<f32>, ROWS_WG_HELD_STAGE>;

// Σ v over the workgroup, the same in every invocation. Called in uniform
// control flow. Back to back calls are safe: a call's first barrier comes
// after every invocation has read the previous call's wg_stage.
fn workgroup_total(lid: u32, v: vec4<f32>) -> vec4<f32> {
    wg_partials[lid] = v;
    workgroupBarrier();
    let per = ROWS_WG_HELD / ROWS_WG_HELD_STAGE;
    if (lid < ROWS_WG_HELD_STAGE) {
        var s = vec4<f32>(0.0);
        for (var i = 0u; i < per; i++) {
            s += wg_partials[lid * per + i];
        }
        wg_stage[lid] = s;
    }
    workgroupBarrier();
    var total = vec4<f32>(0.0);
    for (var i = 0u; i < ROWS_WG_HELD_STAGE; i++) {
        total += wg_stage[i];
    }
    return total;
}
