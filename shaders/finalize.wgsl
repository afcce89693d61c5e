// Finalize pass of the statistics engine, and the eval-mode statistics.
//
// `finalize`: merges the partials of a group (Chan) into the group's
// statistics vec4(shift, dmean, rstd, var) at scratch[group]. Without a
// running-stat update one workgroup (`finalize_serial`: one invocation)
// handles one group. With an update, one handles one running channel g
// and loops over p (P = 1 for
// BatchNorm; P = N for a tracked InstanceNorm, whose update averages the
// instances' mean and variance as torch does), then updates
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
    let n_loop = finalize_loops(w);
    var sums = vec2<f32>(0.0);
    for (var i = 0u; i < n_loop; i++) {
        let group = finalize_group(i, w);
        wg_sum[lid] = merged_partials(group, lid, FINALIZE_WG);
        workgroupBarrier();
        for (var stride = FINALIZE_WG / 2u; stride > 0u; stride /= 2u) {
            if (lid < stride) {
                wg_sum[lid] = chan_merge(wg_sum[lid], wg_sum[lid + stride]);
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            sums += store_group_stats(group, wg_sum[0]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        update_running(w, sums);
    }
}

// finalize with one invocation per output merging its partials in order:
// no barrier. The host takes it when outputs have few partials
// (engine::FINALIZE_SERIAL_MAX); lavapipe paid about 10 µs of barriers per
// workgroup of the tree version.
@compute @workgroup_size(FINALIZE_WG)
fn finalize_serial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg) * FINALIZE_WG + lid;
    let n_loop = finalize_loops(w);
    if (n_loop == 0u) {
        return;
    }
    var sums = vec2<f32>(0.0);
    for (var i = 0u; i < n_loop; i++) {
        let group = finalize_group(i, w);
        sums += store_group_stats(group, merged_in_order(group));
    }
    update_running(w, sums);
}

// finalize for running channels with many groups each (a tracked
// InstanceNorm's instances, P of them; the host takes it when they have
// more partials than finalize_serial merges and it loops less per
// invocation than finalize, engine::finalize_by_groups): a workgroup per channel w,
// each invocation merging its share of the groups' partials in order and
// storing their statistics, then one tree over the invocations' sums for
// the running update. (finalize's tree per group, P of them in a loop,
// lost every group past about 5,000 on lavapipe.)
var<workgroup> wg_update: array<vec2<f32>, FINALIZE_WG>;

@compute @workgroup_size(FINALIZE_WG)
fn finalize_groups(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg);
    let n_loop = finalize_loops(w);
    var sums = vec2<f32>(0.0);
    for (var i = lid; i < n_loop; i += FINALIZE_WG) {
        let group = finalize_group(i, w);
        sums += store_group_stats(group, merged_in_order(group));
    }
    wg_update[lid] = sums;
    workgroupBarrier();
    for (var stride = FINALIZE_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            wg_update[lid] += wg_update[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u && n_loop > 0u) {
        update_running(w, wg_update[0]);
    }
}

// The (count, mean − shift, M2) of `group`'s partials merged in order by
// one invocation.
fn merged_in_order(group: u32) -> vec3<f32> {
    return merged_partials(group, 0u, 1u);
}

// The (count, mean − shift, M2) of `group`'s partials first, first + step,
// ... merged in two passes: the mean from the compensated sum of the
// partials' count·mean, then M2 = Σ M2_i + n_i·(mean_i − mean)², also
// compensated. This is Chan's merge of all of them at once; merged one by
// one, in order, the mean and M2 picked up a rounding per partial (a
// BatchNorm channel of 64 runs had its variance 5 roundings off, enough
// to move f16 outputs near zero by 4 ulps).
fn merged_partials(group: u32, first: u32, step: u32) -> vec3<f32> {
    let base = params.partials_offset + group * params.merge_tiles;
    var count = 0.0;
    var weighted = Compensated(0.0, 0.0);
    for (var t = first; t < params.merge_tiles; t += step) {
        let s = scratch[base + t].xyz;
        count += s.x;
        weighted = add_compensated(weighted, s.x * s.y);
    }
    if (count == 0.0) {
        return vec3<f32>(0.0);
    }
    let mean = compensated_total(weighted) / count;
    var m2 = Compensated(0.0, 0.0);
    for (var t = first; t < params.merge_tiles; t += step) {
        let s = scratch[base + t].xyz;
        let d = s.y - mean;
        m2 = add_compensated(add_compensated(m2, s.z), s.x * d * d);
    }
    return vec3<f32>(count, mean, compensated_total(m2));
}

// Groups output w merges: with a running-stat update, running channel w's
// P groups (none past the last channel); else group w alone.
fn finalize_loops(w: u32) -> u32 {
    if (has_flag(FLAG_UPDATE_RUNNING)) {
        return select(0u, params.p, w < params.g);
    }
    return select(0u, 1u, w < params.n_groups);
}

// The i-th group of output w.
fn finalize_group(i: u32, w: u32) -> u32 {
    if (has_flag(FLAG_UPDATE_RUNNING)) {
        return w + i * params.g;
    }
    return w;
}

// Writes the statistics of `group` from its merged (count, mean − shift,
// M2) and returns its contribution to the running update: (mean, the
// biased or unbiased variance).
fn store_group_stats(group: u32, s: vec3<f32>) -> vec2<f32> {
    let p = group / params.g;
    let g = group % params.g;
    let shift = group_shift(p, g);
    let variance = s.z / s.x;
    let rstd = batch_rstd(variance);
    scratch[group] = vec4<f32>(shift, s.y, rstd, variance);
    if (has_flag(FLAG_UNBIASED)) {
        return vec2<f32>(shift + s.y, s.z / (s.x - 1.0));
    }
    return vec2<f32>(shift + s.y, variance);
}

// With FLAG_UPDATE_RUNNING, updates running channel w from the sums of its
// P groups' means and variances (torch averages a tracked InstanceNorm's
// instances).
fn update_running(w: u32, sums: vec2<f32>) {
    if (!has_flag(FLAG_UPDATE_RUNNING)) {
        return;
    }
    let n = f32(params.p);
    var keep = params.keep;
    var take = params.take;
    if (has_flag(FLAG_CUMULATIVE)) {
        take = 1.0 / batch_count();
        keep = 1.0 - take;
    }
    running_mean[w] = keep * running_mean[w] + take * (sums.x / n);
    running_var[w] = keep * running_var[w] + take * (sums.y / n);
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
    scratch[group] = vec4<f32>(running_mean[g], 0.0, refined_rsqrt(variance + params.eps), variance);
}
