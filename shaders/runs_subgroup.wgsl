// Run kernels on subgroups, for CPU adapters with Features::SUBGROUP (the
// host checks): one subgroup per run of B contiguous elements (one
// (p, a, g); B a multiple of four, at least RUNS_MIN_LEN), each subgroup
// walking a block of contiguous runs (subgroup_block). BatchNorm over
// [N, C, H, W] is N·C runs of H·W.
//
// Why: a CPU thread running a subgroup that walks contiguous memory streams
// it. On lavapipe, summing 32x64x56x56 run by run took 2.5 ms, against
// 9 ms for the tiled partials (each SIMD row of 8 lanes there reads 128
// bytes, then jumps) and 6 to 9 ms for the copy kernel to read and write
// it once.
//
// partials_runs writes one partial per run, vec4(count, mean, M2, 0) of its
// values shifted by the group's shift, at the slot of its group and run
// index a (merge_tiles = A partials per group), for the finalize pass.
// normalize_runs_subgroup writes y run by run with the run's statistics
// and, one per run (AFFINE_PER_RUN), its γ and β folded into a scale and
// an offset.
//
// Half storage of runs of a multiple of 8 elements is bound as vec4<u32>
// (PAIRED_ACCESS): lanes move pairs of vectors, one 16-byte access each,
// as rows_subgroup.wgsl does.

// (p, a, g) of run r = (p·A + a)·G + g.
fn run_coords(r: u32) -> vec3<u32> {
    let pa = fast_div(r, params.div_g);
    let g = r - pa * params.g;
    var p = 0u;
    if (params.p != 1u) {
        // r·B is the run's first element, below total (a u32).
        p = fast_div(r * params.b, params.div_agb);
    }
    return vec3<u32>(p, pa - p * params.a, g);
}

@compute @workgroup_size(ROWS_SG_WG)
fn partials_runs(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, ROWS_SG_WG, linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let runs = subgroup_block(steps, params.p * params.a * params.g);
    if (steps.first == 0u && lane == 0u && has_flag(FLAG_BUMP_COUNTER)) {
        bump_counter_once();
    }
    let n4 = params.b / 4u;
    let w = steps.width;
    for (var r = runs.x; r < runs.y; r++) {
        let at = run_coords(r);
        let base4 = r * n4;
        // The run's sums are centred on one of its own first four values
        // (lower_median4: one outlier among them cannot move it far), not
        // on the group's shift (a median of three elements of the group,
        // sometimes 2σ from the mean, for every run alike): sq − sum·mean
        // then cancels less, and the runs' errors differ and average out
        // in the merge (BatchNorm 32x64x56x56: variance 5 roundings off
        // before, 2 after). The partial's mean is kept relative to the
        // group's shift; the difference of the two is exact for nearby
        // values. An inf or NaN among the four keeps the group's shift,
        // so an inf still gives the infinite mean torch's has.
        let group_at = group_shift(at.x, at.z);
        var shift = group_at;
        let own = lower_median4(load_x4(base4));
        if (!IS_RMS && is_finite(own - group_at)) {
            shift = own;
        }
        // Four independent vectors per step keep four loads in flight
        // (two: BatchNorm 32x64x56x56 train 9.7 ms on lavapipe, four with
        // the normalize's two below 9.3 ms; eval 5.5 to 5.1 ms).
        var sums = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
        var other = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
        if (PAIRED_ACCESS) {
            // Pairs of vectors, one access each (half storage of runs of a
            // multiple of 8): two pairs per step, the same four vectors.
            // Runs of whole pairs start at one (n4 is even).
            let base8 = base4 / 2u;
            var j8 = lane;
            for (; j8 + w < n4 / 2u; j8 += 2u * w) {
                sums += shifted_pair_terms(base8 + j8, shift);
                other += shifted_pair_terms(base8 + j8 + w, shift);
            }
            if (j8 < n4 / 2u) {
                sums += shifted_pair_terms(base8 + j8, shift);
            }
        } else {
            var s3 = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
            var s4 = mat2x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0));
            var j4 = lane;
            for (; j4 + 3u * w < n4; j4 += 4u * w) {
                sums += shifted_terms4(4u * (base4 + j4), shift);
                other += shifted_terms4(4u * (base4 + j4 + w), shift);
                s3 += shifted_terms4(4u * (base4 + j4 + 2u * w), shift);
                s4 += shifted_terms4(4u * (base4 + j4 + 3u * w), shift);
            }
            for (; j4 < n4; j4 += w) {
                sums += shifted_terms4(4u * (base4 + j4), shift);
            }
            other += s3 + s4;
        }
        let t1 = subgroupAdd(hsum(sums[0] + other[0]));
        let t2 = subgroupAdd(hsum(sums[1] + other[1]));
        if (lane == 0u) {
            let summary = shifted_summary(params.b, t1, t2);
            let slot = (at.x * params.g + at.z) * params.merge_tiles + at.y;
            scratch[params.partials_offset + slot] = vec4<f32>(f32(params.b), (shift - group_at) + summary.x, summary.y, 0.0);
        }
    }
}

@compute @workgroup_size(ROWS_SG_WG)
fn normalize_runs_subgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg: u32,
) {
    let steps = subgroup_rows(lane, sg, ROWS_SG_WG, linear_workgroup(wid, nwg), nwg.x * nwg.y);
    let runs = subgroup_block(steps, params.p * params.a * params.g);
    let n4 = params.b / 4u;
    let w = steps.width;
    for (var r = runs.x; r < runs.y; r++) {
        let at = run_coords(r);
        let g = at.z;
        let st = scratch[at.x * params.g + g];
        let base4 = r * n4;
        if (PAIRED_ACCESS && AFFINE_MODE == AFFINE_PER_RUN) {
            // Pairs of vectors, one access each way (runs of whole pairs
            // start at one), one γ and β per run folded. The other modes
            // (γ within runs) take the single accesses below.
            let k = run_scale_offset(st, g);
            let base8 = base4 / 2u;
            for (var j8 = lane; j8 < n4 / 2u; j8 += w) {
                let x = load_x8(base8 + j8);
                store_y8(base8 + j8, (x[0] - k.x) * k.y + k.z, (x[1] - k.x) * k.y + k.z);
            }
        } else if (AFFINE_MODE == AFFINE_PER_RUN) {
            // One γ and β per run (BatchNorm, InstanceNorm), folded.
            let k = run_scale_offset(st, g);
            // Two vectors per step, loaded before either is stored.
            var j4 = lane;
            for (; j4 + w < n4; j4 += 2u * w) {
                let a0 = load_x4(base4 + j4);
                let a1 = load_x4(base4 + j4 + w);
                store_y4(base4 + j4, (a0 - k.x) * k.y + k.z);
                store_y4(base4 + j4 + w, (a1 - k.x) * k.y + k.z);
            }
            if (j4 < n4) {
                store_y4(base4 + j4, (load_x4(base4 + j4) - k.x) * k.y + k.z);
            }
        } else {
            for (var j4 = lane; j4 < n4; j4 += w) {
                let xn = ((load_x4(base4 + j4) - st.x) - st.y) * st.z;
                store_y4(base4 + j4, affine4(xn, g, g * n4 + j4));
            }
        }
    }
}
