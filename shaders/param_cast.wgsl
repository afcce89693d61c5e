// Parameters and running statistics stored as f16 or bf16 (SPEC.md §5: the
// input's dtype or f32): every other kernel reads and writes them as f32, so
// src/norm/half_params.rs widens each into an f32 working copy before a pass
// (exactly) and narrows what the pass wrote back after it (rounded once to
// nearest even, by half_convert.wgsl, which is prepended).
//
// Halves are packed two to a u32 word, element 2k in the low half (as in
// io_f16.wgsl). One invocation per word, so no two write the same word; the
// last word of an odd length keeps its high half (it is padding the caller
// may use for something else).

struct CastParams {
    // Elements of the tensor.
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: CastParams;
@group(0) @binding(1) var<storage, read_write> halves: array<u32>;
@group(0) @binding(2) var<storage, read_write> floats: array<f32>;

const CAST_WG: u32 = 64u;

// The word of this invocation on a 2-D grid (src/kernels.rs `grid`).
fn word_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * CAST_WG + lid;
}

fn store_pair(w: u32, pair: vec2<f32>) {
    floats[2u * w] = pair.x;
    if (2u * w + 1u < params.len) {
        floats[2u * w + 1u] = pair.y;
    }
}

// The high half of word w: element 2w + 1's bits, or the word's own
// padding past an odd length.
fn high_bits(w: u32, bits: u32) -> u32 {
    if (2u * w + 1u < params.len) {
        return bits;
    }
    return halves[w] >> 16u;
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

@compute @workgroup_size(CAST_WG)
fn widen_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = word_index(wid, nwg, lid);
    if (2u * w >= params.len) {
        return;
    }
    let word = halves[w];
    store_pair(w, vec2<f32>(f16_value(word & 0xffffu), f16_value(word >> 16u)));
}

@compute @workgroup_size(CAST_WG)
fn widen_bf16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = word_index(wid, nwg, lid);
    if (2u * w >= params.len) {
        return;
    }
    store_pair(w, bf16_pair(halves[w]));
}

@compute @workgroup_size(CAST_WG)
fn narrow_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = word_index(wid, nwg, lid);
    if (2u * w >= params.len) {
        return;
    }
    let odd = min(2u * w + 1u, params.len - 1u);
    let bits = f16_bits4(vec4<f32>(floats[2u * w], floats[odd], 0.0, 0.0));
    halves[w] = bits.x | (high_bits(w, bits.y) << 16u);
}

@compute @workgroup_size(CAST_WG)
fn narrow_bf16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = word_index(wid, nwg, lid);
    if (2u * w >= params.len) {
        return;
    }
    let odd = min(2u * w + 1u, params.len - 1u);
    let bits = bf16_bits4(vec4<f32>(floats[2u * w], floats[odd], 0.0, 0.0));
    halves[w] = bits.x | (high_bits(w, bits.y) << 16u);
}
