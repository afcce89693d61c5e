// Backward run kernels on subgroups, for CPU adapters with Features::SUBGROUP
// (the host checks): the stats view's runs of SB contiguous elements are
// whole vectors with one γ per run (BatchNorm and tracked InstanceNorm
// channels-first: BWD_VEC4, BWD_AFFINE 1), one subgroup per run, each
// subgroup walking a block of contiguous runs (subgroup_block), as the
// forward's runs_subgroup.wgsl and for the same reason: the CPU thread
// running a subgroup streams through memory.
//
// Half storage of runs of a multiple of 8 elements is bound as vec4<u32>
// (PAIRED_ACCESS, backward_io_half_pairs.wgsl): lanes move pairs of
// vectors of x, grad_output and grad_input, one 16-byte access each.
//
// bwd_partials_runs writes a partial per run, (Σg, Σg·x̂, Σdy, Σdy·x̂) at
// work[partials_offset + group·group_stride + a] (group_stride = SA), which
// bwd_finalize merges; bwd_dx_runs writes grad_input run by run from the
// group sums at work[group] (or running statistics), as dx_runs.

// (p, a, g) of run r = (p·SA + a)·SG + g of the stats view.
fn bwd_run_coords(r: u32) -> vec3<u32> {
    let pa = fast_div(r, bp.div_sg);
    let g = r - pa * bp.sg;
    // r·SB is the run's first element, below total (a u32).
    let p = fast_div(r * bp.sb, bp.div_sagsb);
    return vec3<u32>(p, pa - p * bp.sa, g);
}

@compute @workgroup_size(BWD_SG_WG)
fn bwd_partials_runs(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, BWD_SG_WG, bwd_linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let runs = subgroup_block(steps, bp.total / bp.sb);
    let n4 = bp.sb / 4u;
    let w = steps.width;
    for (var r = runs.x; r < runs.y; r++) {
        let at = bwd_run_coords(r);
        let group = at.x * bp.sg + at.z;
        let st = stats[group];
        let base4 = r * n4;
        // Two independent vectors per step keep two loads in flight.
        var sums = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
        var other = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
        if (PAIRED_ACCESS) {
            // A pair per step (runs of whole pairs start at one).
            for (var j8 = lane; j8 < n4 / 2u; j8 += w) {
                let d = load_dy8(base4 / 2u + j8);
                let x = load_x8(base4 / 2u + j8);
                sums += dy_terms_of(d[0], x[0], st);
                other += dy_terms_of(d[1], x[1], st);
            }
        } else {
            var j4 = lane;
            for (; j4 + w < n4; j4 += 2u * w) {
                sums += dy_terms4(base4 + j4, st);
                other += dy_terms4(base4 + j4 + w, st);
            }
            if (j4 < n4) {
                sums += dy_terms4(base4 + j4, st);
            }
        }
        let sum_dy = subgroupAdd(hsum(sums[0] + other[0]));
        let sum_dy_xhat = subgroupAdd(hsum(sums[1] + other[1]));
        if (lane == 0u) {
            work[bp.partials_offset + group * bp.group_stride + at.y] =
                sums_with_weight(sum_dy, sum_dy_xhat, weight_of_group(at.z));
        }
    }
}

@compute @workgroup_size(BWD_SG_WG)
fn bwd_dx_runs(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, BWD_SG_WG, bwd_linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let runs = subgroup_block(steps, bp.total / bp.sb);
    let n4 = bp.sb / 4u;
    let w = steps.width;
    for (var r = runs.x; r < runs.y; r++) {
        let at = bwd_run_coords(r);
        let group = at.x * bp.sg + at.z;
        var s = vec4<f32>(0.0);
        if (!BWD_RUNNING) {
            s = work[group];
        }
        let k = dx_coefficients(stats[group], s, weight_of_group(at.z));
        let base4 = r * n4;
        if (PAIRED_ACCESS) {
            for (var j8 = lane; j8 < n4 / 2u; j8 += w) {
                let i8 = base4 / 2u + j8;
                let d = load_dy8(i8);
                var dx = array<vec4<f32>, 2>(k.x * d[0], k.x * d[1]);
                if (!BWD_RUNNING) {
                    let x = load_x8(i8);
                    // As dx_from, term by term.
                    dx[0] = dx[0] + k.y * (x[0] - k.w) + k.z;
                    dx[1] = dx[1] + k.y * (x[1] - k.w) + k.z;
                }
                store_dx8(i8, dx[0], dx[1]);
            }
        } else {
            for (var j4 = lane; j4 < n4; j4 += w) {
                store_dx4(base4 + j4, dx_from(base4 + j4, vec4<f32>(k.x), vec4<f32>(k.y), vec4<f32>(k.z), vec4<f32>(k.w)));
            }
        }
    }
}
