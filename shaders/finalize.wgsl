// Finalize pass of the statistics engine, and the eval-mode statistics.
//
// `finalize`: merges the partials of a group (Chan) into the group's
// statistics vec4(shift, dmean, rstd, var) at scratch[group]. Without a
// running-stat update one workgroup handles one group. With an update, one
// workgroup handles one running channel g and loops over p (P = 1 for
// BatchNorm; P = N for a tracked InstanceNorm, whose update averages the
// instances' mean and variance as torch does), then invocation 0 updates
// running_mean/running_var[g]. No float atomics are needed: each running
// channel is written by exactly one invocation.
//
// `eval_stats`: one invocation per group writes the statistics from the
// running buffers: vec4(running_mean, 0, 1/sqrt(running_var + eps), var).

var<workgroup> wg_sum: array<vec3<f32>, FINALIZE_WG>;

fn batch_count() -> f32 {
    return f32(counter[0]) + f32(counter[1]) * 4294967296.0;
}

@compute @workgroup_size(FINALIZE_WG)
fn finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg);
    let update = has_flag(FLAG_UPDATE_RUNNING);
    var first_group = w;
    var group_step = 1u;
    var n_loop = 1u;
    if (update) {
        if (w >= params.g) {
            return;
        }
        first_group = w;
        group_step = params.g;
        n_loop = params.p;
    } else if (w >= params.n_groups) {
        return;
    }
    var mean_sum = 0.0;
    var var_sum = 0.0;
    for (var i = 0u; i < n_loop; i++) {
        let group = first_group + i * group_step;
        var acc = vec3<f32>(0.0, 0.0, 0.0);
        for (var t = lid; t < params.merge_tiles; t += FINALIZE_WG) {
            acc = chan_merge(acc, scratch[params.partials_offset + group * params.merge_tiles + t].xyz);
        }
        wg_sum[lid] = acc;
        workgroupBarrier();
        for (var stride = FINALIZE_WG / 2u; stride > 0u; stride /= 2u) {
            if (lid < stride) {
                wg_sum[lid] = chan_merge(wg_sum[lid], wg_sum[lid + stride]);
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            let s = wg_sum[0];
            let p = group / params.g;
            let g = group % params.g;
            let shift = group_shift(p, g);
            let variance = s.z / s.x;
            let rstd = 1.0 / sqrt(variance + params.eps);
            scratch[group] = vec4<f32>(shift, s.y, rstd, variance);
            mean_sum += shift + s.y;
            if (has_flag(FLAG_UNBIASED)) {
                var_sum += s.z / (s.x - 1.0);
            } else {
                var_sum += variance;
            }
        }
        workgroupBarrier();
    }
    if (update && lid == 0u) {
        let n = f32(params.p);
        var keep = params.keep;
        var take = params.take;
        if (has_flag(FLAG_CUMULATIVE)) {
            take = 1.0 / batch_count();
            keep = 1.0 - take;
        }
        running_mean[w] = keep * running_mean[w] + take * (mean_sum / n);
        running_var[w] = keep * running_var[w] + take * (var_sum / n);
    }
}

@compute @workgroup_size(FINALIZE_WG)
fn eval_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = linear_workgroup(wid, nwg) * FINALIZE_WG + lid;
    if (group >= params.n_groups) {
        return;
    }
    let g = group % params.g;
    let variance = running_var[g];
    scratch[group] = vec4<f32>(running_mean[g], 0.0, 1.0 / sqrt(variance + params.eps), variance);
}
