// Parameters and running statistics stored as f16 or bf16 (SPEC.md §5: the
// input's dtype or f32): every other kernel reads and writes them as f32, so
// src/norm/half_params.rs widens each into an f32 working copy before a pass
// (exactly) and narrows what the pass wrote back after it (rounded once to
// nearest even, by half_convert.wgsl, which is prepended).
//
// One dispatch casts up to four tensors (γ, β, running mean and variance),
// each with its own length: lavapipe pays a good part of a small layer's
// forward per dispatch. WGSL cannot index bindings, so
// src/norm/half_params.rs appends the bindings `half0..3` (packed halves)
// and `copy0..3` (f32) and one `cast_slot0..3` function per slot, with the
// access modes of the direction.
//
// Halves are packed two to a u32 word, element 2k in the low half (as in
// io_half.wgsl). One invocation per word, so no two write the same word; the
// last word of an odd length keeps its high half (it is padding the caller
// may use for something else).

struct CastParams {
    // Elements of each slot's tensor (0: the slot is unused).
    len: vec4<u32>,
}

@group(0) @binding(0) var<uniform> params: CastParams;

const CAST_WG: u32 = 64u;

// The word of this invocation on a 2-D grid (src/kernels.rs `grid`).
fn word_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * CAST_WG + lid;
}

// The f16 bits in the low half of h as f32, exactly, by integer arithmetic:
// unpack2x16float may flush f16 subnormals to zero on some GPUs, and a
// running variance of a near-constant channel lives there.
fn f16_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // Zero or subnormal: m·2^-24, a normal f32.
        return bitcast<f32>(bitcast<u32>(ldexp(f32(m), -24)) | sign);
    }
    if (e == 31u) {
        // ±inf, or NaN with its payload.
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// The two halves of a word as f32 (element 2k first).
fn widen_word(word: u32, bf16: bool) -> vec2<f32> {
    if (bf16) {
        return bf16_pair(word);
    }
    return vec2<f32>(f16_value(word & 0xffffu), f16_value(word >> 16u));
}

// Two f32 values as the bits of two halves.
fn narrow_pair(v: vec2<f32>, bf16: bool) -> vec2<u32> {
    let wide = vec4<f32>(v, 0.0, 0.0);
    if (bf16) {
        return bf16_bits4(wide).xy;
    }
    return f16_bits4(wide).xy;
}

fn cast_all(w: u32, bf16: bool) {
    cast_slot0(w, bf16);
    cast_slot1(w, bf16);
    cast_slot2(w, bf16);
    cast_slot3(w, bf16);
}

@compute @workgroup_size(CAST_WG)
fn cast_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    cast_all(word_index(wid, nwg, lid), false);
}

@compute @workgroup_size(CAST_WG)
fn cast_bf16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    cast_all(word_index(wid, nwg, lid), true);
}
