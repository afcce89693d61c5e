// How the subgroup row kernels (the forward's rows_subgroup and the
// backward's bwd_rows_subgroup) spread rows over subgroups: a subgroup
// takes a slot in its workgroup from an atomic counter (subgroups need not
// be laid out by local index), then walks rows first, first + stride, ...
// A subgroup larger than the workgroup is partial: its lanes are the
// workgroup's invocations, so width is at most the workgroup size.

var<workgroup> next_slot: atomic<u32>;

struct SubgroupRows {
    first: u32,
    stride: u32,
    // Lanes of the subgroup that walk a row together.
    width: u32,
}

// Called by every lane in uniform control flow: lane 0 takes the slot and
// the sum hands it to every lane (the other lanes add zero).
fn subgroup_rows(lane: u32, sg: u32, wg_size: u32, workgroup: u32, workgroups: u32) -> SubgroupRows {
    var slot = 0u;
    if (lane == 0u) {
        slot = atomicAdd(&next_slot, 1u);
    }
    slot = subgroupAdd(slot);
    let width = min(sg, wg_size);
    let per_wg = wg_size / width;
    return SubgroupRows(workgroup * per_wg + slot, workgroups * per_wg, width);
}

// The block [x, y) of `count` rows or runs that this subgroup walks: they
// are split in order into one block of contiguous ones per subgroup, so the
// CPU thread running a subgroup streams through memory.
fn subgroup_block(steps: SubgroupRows, count: u32) -> vec2<u32> {
    let per = (count + steps.stride - 1u) / steps.stride;
    let first = min(steps.first * per, count);
    return vec2<u32>(first, min(first + per, count));
}
