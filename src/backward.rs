//! The backward pass of every normalization (SPEC.md §4): plans and records
//! it on the device from the statistics the forward saved, with no read-back.
//!
//! Per element, with `g = dy·γ` and `x̂` from the saved statistics, the
//! kernels need two sums per statistics group (`Σg`, `Σg·x̂`) for
//! `grad_input`, and two sums per affine index (`Σdy`, `Σdy·x̂`) for
//! `grad_bias` and `grad_weight`. WGSL has no float atomics, so every sum is
//! two-stage: per-workgroup partials, then a finalize pass ([`plan_backward`]
//! says which kernels run; it is a pure function tests and benches can call).
//!
//! - Contiguous groups (LayerNorm, RMSNorm, InstanceNorm, GroupNorm
//!   channels-first): one `Rows` dispatch reduces a group in one workgroup
//!   and writes its `grad_input` (with f16/bf16 storage only for groups of
//!   even length: a packed word must never span two workgroups; odd groups
//!   take the tiled path below).
//!   On adapters with subgroups, groups of whole vectors take
//!   `RowsSubgroup` instead: one group per subgroup, no workgroup barrier.
//! - Channels-last statistics (BatchNorm over `[N, ..., C]` or `(N, C)`,
//!   channels in whole vectors): `ChannelCols` sums each channel over row
//!   blocks (merged by `Finalize`), `ChannelGradInput` writes grad_input;
//!   each invocation loads its eight channels' statistics once.
//! - Other groups (BatchNorm channels-first, channels-last GroupNorm):
//!   per-run partials on a CPU with subgroups (`PartialsRuns`), else one
//!   partial per invocation over tiles (`PartialsEach`) or per tile
//!   (`Partials`), `Finalize` to per-group sums, elementwise
//!   `GradInput` (by runs, with the run's coefficients found once, when runs
//!   are whole vectors with one γ each).
//! - Eval mode with running statistics: `grad_input = g·rstd` elementwise.
//! - A tensor larger than one storage binding ([`Chunks`]) where an aligned
//!   run of rows or samples fits a binding: the plan above for each chunk
//!   of whole rows (samples), the affine gradients of later chunks added to
//!   the earlier ones' (`plan_blocks`).
//!   Otherwise, split within groups: `Partials` and `GradInput` once per
//!   chunk over its elements, one `Finalize` over every chunk's partials,
//!   and the affine gradients of an index per column through the
//!   `[1, R, K, D]` view below (`plan_chunked`).
//! - Affine gradients: when the affine index is the statistics channel
//!   (BatchNorm, InstanceNorm) they come out of the group sums, summed over
//!   samples by `Finalize`; an affine index per column (LayerNorm, RMSNorm,
//!   channels-last GroupNorm) uses the coalesced `Cols` kernel (plus a
//!   `Finalize` when there is more than one block of rows), or on a CPU
//!   the row kernel's own per-step column sums finished by `ColumnSums`
//!   (`fused_column_sums`); anything else
//!   (channels-first GroupNorm with several channels per group) reduces an
//!   `[1, R, K, D]` view with `Partials` + `Finalize`.
//!
//! Storage: `x`, `grad_output` and `grad_input` share the input's dtype
//! (f32, f16 or bf16, halves loaded as packed `u32`, no shader feature);
//! every sum is f32 and `grad_input` is rounded once at the store, one
//! invocation writing both halves of a word. The kernels read γ and write
//! the parameter gradients as f32; half-precision ones go through f32
//! working copies (`norm::half_params`).
//!
//! Scratch is bounded: at most one vec4 per group plus one per partial (per
//! tile of 4096 elements, per invocation of a tile, or per run), or per
//! column and block of at least [`COLS_MIN_ROWS`] rows.

use std::sync::Arc;

use crate::context::Context;
use crate::engine::{Caps, Chunks, StatsSource};
use crate::error::{Error, Result};
use crate::kernels;
use crate::norm::half_params::{self, Cast};
use crate::norm::{submit_scoped, Affine, Saved};
use crate::tensor::{DType, GpuTensor};
use crate::view::View;

/// Invocations per workgroup of the rows, partials, grad-input and column
/// kernels: 64, a whole wave on every vendor, with fewer invocations to
/// stop at each workgroup barrier (lavapipe pays per invocation there:
/// LayerNorm backward 4096x1024 went from ~246 to ~170 ms).
pub const BWD_WG: u32 = 64;
/// Elements each partials invocation sums: one tile is 4096 elements, as in
/// the forward, so the finalize pass merges few partials.
pub const BWD_PER_THREAD: u32 = 64;
/// Elements of one tile of the partials pass.
pub const BWD_TILE: u32 = BWD_WG * BWD_PER_THREAD;
/// Invocations per workgroup of the subgroup row kernel (one group per
/// subgroup, as many subgroups as fit).
pub const BWD_SG_WG: u32 = 64;
/// Invocations per workgroup of the finalize pass (few partials per output).
pub const BWD_FINALIZE_WG: u32 = 64;
/// Consecutive elements each grad-input invocation writes (as the forward's
/// normalize pass).
pub const BWD_DX_PER_THREAD: u32 = 4;
/// Vectors each grad-input invocation writes when it works by runs
/// (`dx_by_runs`).
pub const BWD_DX_RUN_VEC4: u32 = 4;
/// Fewest rows a block of the column kernel sums (unless the tensor has fewer
/// rows): keeps the column partials (one vec4 per column and block) at most
/// 1/8 of the input's bytes.
pub const COLS_MIN_ROWS: usize = 32;
/// Most row blocks of the column kernel: enough workgroups to fill a GPU for
/// rows of a few hundred columns, few partials per column to merge.
pub const COLS_MAX_BLOCKS: usize = 256;
/// Invocations the channel-column kernel aims for (it takes more row blocks
/// when channels are few): enough to fill a GPU, or a CPU (lavapipe), where
/// fewer and longer blocks amortize each invocation's setup (the strip's
/// statistics and γ) and leave fewer partials to merge.
pub const CHANNEL_INVOCATIONS: usize = 16384;
pub const CHANNEL_INVOCATIONS_CPU: usize = 2048;
/// Rows each invocation of the channels-last grad-input kernel writes: 16
/// on a GPU, 64 on a CPU (each invocation first finds its eight channels'
/// coefficients).
pub const CHANNEL_DX_ROWS: usize = 16;
pub const CHANNEL_DX_ROWS_CPU: usize = 64;

/// One backward entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackwardKernel {
    /// A whole contiguous group per workgroup: sums and grad_input.
    Rows,
    /// A whole contiguous group per subgroup (groups of whole vectors, on
    /// adapters with subgroups): sums and grad_input.
    RowsSubgroup,
    /// Per-tile partial sums of a reduction view.
    Partials,
    /// Per-invocation partial sums of channels-first BatchNorm groups (no
    /// workgroup tree).
    PartialsEach,
    /// Merges partials into group sums and/or affine gradients.
    Finalize,
    /// Elementwise grad_input from group sums (or running statistics).
    GradInput,
    /// Column sums for an affine index per column.
    Cols,
    /// Channels-last statistics: per-channel sums over row blocks.
    ChannelCols,
    /// [`BackwardKernel::ChannelCols`] with a subgroup per row, each lane
    /// holding its vectors' statistics and sums (`held_channels`).
    ChannelColsHeld,
    /// Channels-last statistics: grad_input from per-channel coefficients.
    ChannelGradInput,
    /// [`BackwardKernel::ChannelGradInput`] with a subgroup per row, each
    /// lane holding its vectors' coefficients (`held_channels`).
    ChannelGradInputHeld,
    /// dγ and dβ from the per-step column sums of `RowsSubgroup` with
    /// `BWD_COLUMN_SUMS` (`fused_column_sums`).
    ColumnSums,
    /// A row per subgroup held in registers (the forward's held rows):
    /// x and dy read once; with `BWD_COLUMN_SUMS`, column sums per block of
    /// rows for [`BackwardKernel::ColumnSums`].
    RowsHeld,
    /// A group per workgroup held in registers (the forward's workgroup-held
    /// rows, GPUs): x and dy read once for grad_input and, where channels
    /// have their own γ, per-channel partials.
    RowsWorkgroupHeld,
    /// A partial per run of SB, a subgroup per run (`runs_on_subgroups`).
    PartialsRuns,
    /// grad_input run by run, a subgroup per run (`runs_on_subgroups`).
    GradInputRuns,
    /// The affine gradients of an empty input: sums over no element.
    EmptyAffineGrads,
}

impl BackwardKernel {
    /// Every kernel, for validation tests.
    pub const ALL: [BackwardKernel; 17] = [
        BackwardKernel::RowsWorkgroupHeld,
        BackwardKernel::ChannelColsHeld,
        BackwardKernel::ChannelGradInputHeld,
        BackwardKernel::RowsHeld,
        BackwardKernel::PartialsRuns,
        BackwardKernel::GradInputRuns,
        BackwardKernel::Rows,
        BackwardKernel::RowsSubgroup,
        BackwardKernel::Partials,
        BackwardKernel::PartialsEach,
        BackwardKernel::Finalize,
        BackwardKernel::GradInput,
        BackwardKernel::Cols,
        BackwardKernel::ChannelCols,
        BackwardKernel::ChannelGradInput,
        BackwardKernel::ColumnSums,
        BackwardKernel::EmptyAffineGrads,
    ];

    /// WGSL entry point name.
    pub fn entry_point(self) -> &'static str {
        match self {
            BackwardKernel::Rows => "bwd_rows",
            BackwardKernel::RowsSubgroup => "bwd_rows_subgroup",
            BackwardKernel::Partials => "bwd_partials",
            BackwardKernel::PartialsEach => "bwd_partials_each",
            BackwardKernel::Finalize => "bwd_finalize",
            BackwardKernel::GradInput => "bwd_dx",
            BackwardKernel::Cols => "bwd_cols",
            BackwardKernel::ChannelCols => "bwd_channel_cols",
            BackwardKernel::ChannelColsHeld => "bwd_channel_cols_held",
            BackwardKernel::ChannelGradInput => "bwd_channel_dx",
            BackwardKernel::ChannelGradInputHeld => "bwd_channel_dx_held",
            BackwardKernel::ColumnSums => "bwd_column_sums",
            BackwardKernel::RowsHeld => "bwd_rows_held",
            BackwardKernel::RowsWorkgroupHeld => "bwd_rows_workgroup_held",
            BackwardKernel::PartialsRuns => "bwd_partials_runs",
            BackwardKernel::GradInputRuns => "bwd_dx_runs",
            BackwardKernel::EmptyAffineGrads => "bwd_empty_affine_grads",
        }
    }

    /// Whether the kernel needs subgroup operations.
    pub fn uses_subgroups(self) -> bool {
        matches!(
            self,
            BackwardKernel::RowsSubgroup
                | BackwardKernel::RowsHeld
                | BackwardKernel::RowsWorkgroupHeld
                | BackwardKernel::PartialsRuns
                | BackwardKernel::GradInputRuns
                | BackwardKernel::ChannelGradInputHeld
                | BackwardKernel::ChannelColsHeld
        )
    }
}

// A grad-input invocation's run of elements is whole words of packed halves,
// and one vector on the BWD_VEC4 path.
const _: () = assert!(BWD_DX_PER_THREAD == 4);

/// Whether runs of the stats view are whole vectors of four (the kernels'
/// `BWD_VEC4` paths): the column kernel then has one invocation per four
/// columns.
fn vec4_runs(p: &BwdParams) -> bool {
    p.sb.is_multiple_of(4)
}

/// Whether grad_input is written run by run (runs of whole vectors with one
/// γ per run, `BWD_AFFINE` 1: BatchNorm, InstanceNorm), each workgroup one
/// block of one run, so that the run's coefficients are found once.
fn dx_by_runs(p: &BwdParams) -> bool {
    vec4_runs(p) && p.affine_div == p.sb
}

/// Whether the partials and grad_input go run by run on subgroups, a
/// subgroup walking a block of contiguous runs (backward_runs_subgroup.wgsl):
/// CPU adapters with subgroups, runs of whole vectors with one γ each, as
/// long as the forward's runs on subgroups ([`crate::engine::uses_partials_runs`]).
fn runs_on_subgroups(p: &BwdParams, caps: &Caps) -> bool {
    caps.cpu
        && caps.subgroups
        && dx_by_runs(p)
        && (kernels::RUNS_MIN_LEN..=kernels::ROWS_MAX_LEN).contains(&p.sb)
}

// Runs on subgroups are sized by the forward's block rule.
const _: () = assert!(BWD_SG_WG == kernels::ROWS_SG_WG);

/// The grad-input step for parameters `d`: its workgroups, with `d.tiles`
/// set to the blocks per run when it works by runs.
fn grad_input_step(mut d: BwdParams) -> (usize, BwdParams) {
    let total = d.total as usize;
    if dx_by_runs(&d) {
        let run = d.sb as usize;
        let per_block = (BWD_WG * BWD_DX_RUN_VEC4) as usize;
        let blocks = (run / 4).div_ceil(per_block);
        d.tiles = blocks as u32;
        ((total / run) * blocks, d)
    } else {
        (total.div_ceil((BWD_WG * BWD_DX_PER_THREAD) as usize), d)
    }
}

/// The backward's io files of x, grad_output and grad_input (paired:
/// [`BF_PAIRS`]), for [`kernels::io_source`].
const BACKWARD_IO: kernels::IoFiles = kernels::IoFiles {
    f32: include_str!("../shaders/backward_io_f32.wgsl"),
    half: include_str!("../shaders/backward_io_half.wgsl"),
    half_pairs: include_str!("../shaders/backward_io_half_pairs.wgsl"),
    single_access: include_str!("../shaders/backward_single_access.wgsl"),
};

/// The complete WGSL source of the backward kernels for storage `dtype` (of
/// `x`, `grad_output` and `grad_input`); with `subgroups`, the subgroup row
/// kernels too (they need `Features::SUBGROUP` to compile). With
/// `paired` (half storage only), for the held-row kernel with
/// paired slots and the subgroup row and run kernels on rows and runs of
/// whole pairs: their io moves two vectors per access.
pub fn source(dtype: DType, subgroups: bool, paired: bool) -> String {
    let prelude = format!(
        "const BWD_WG: u32 = {BWD_WG}u;\n\
         const BWD_SG_WG: u32 = {BWD_SG_WG}u;\n\
         const BWD_PER_THREAD: u32 = {BWD_PER_THREAD}u;\n\
         const BWD_FINALIZE_WG: u32 = {BWD_FINALIZE_WG}u;\n\
         const BWD_DX_PER_THREAD: u32 = {BWD_DX_PER_THREAD}u;\n\
         const BWD_DX_RUN_VEC4: u32 = {BWD_DX_RUN_VEC4}u;\n\
         const ROWS_WG_HELD: u32 = {ROWS_WG_HELD}u;\n",
        ROWS_WG_HELD = kernels::ROWS_WG_HELD
    );
    let subgroup_kernel = if subgroups {
        [
            kernels::SUBGROUP_ROWS,
            include_str!("../shaders/backward_rows_subgroup.wgsl"),
            kernels::HELD_SLOTS_SOURCE,
            include_str!("../shaders/backward_rows_held.wgsl"),
            kernels::WORKGROUP_TOTAL,
            include_str!("../shaders/backward_rows_workgroup_held.wgsl"),
            include_str!("../shaders/backward_runs_subgroup.wgsl"),
            include_str!("../shaders/backward_channels_held.wgsl"),
        ]
        .join("\n")
    } else {
        String::new()
    };
    [
        prelude.as_str(),
        kernels::HALF_CONVERT,
        kernels::FAST_DIV,
        kernels::COMPENSATED,
        &kernels::io_source(dtype, paired, &BACKWARD_IO),
        include_str!("../shaders/backward_common.wgsl"),
        include_str!("../shaders/backward.wgsl"),
        include_str!("../shaders/backward_channels.wgsl"),
        &subgroup_kernel,
    ]
    .join("\n")
}

/// What the backward of one forward computes, besides the buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackwardSpec {
    /// The forward's statistics view.
    pub view: View,
    /// Storage of `x`, `grad_output` and `grad_input`.
    pub dtype: DType,
    /// RMSNorm (no Σg term).
    pub rms: bool,
    /// Batch statistics or running statistics (eval mode).
    pub source: StatsSource,
    /// γ is present (g = dy·γ).
    pub weight: bool,
    /// grad_weight is wanted.
    pub grad_weight: bool,
    /// grad_bias is wanted.
    pub grad_bias: bool,
}

/// One recorded dispatch of the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// The entry point.
    pub kernel: BackwardKernel,
    /// Workgroups dispatched (laid out by [`kernels::grid`]).
    pub workgroups: u32,
}

const BF_WEIGHT: u32 = 1;
const BF_RMS: u32 = 2;
const BF_RUNNING: u32 = 4;
const BF_WRITE_GSUM: u32 = 8;
const BF_LOOP_P: u32 = 16;
const BF_GRAD_WEIGHT: u32 = 32;
const BF_GRAD_BIAS: u32 = 64;
const BF_WRITE_PARTIALS: u32 = 128;
/// Host-side only: the finalize step runs `bwd_finalize_serial`.
const BF_SERIAL: u32 = 256;
/// Host-side only: the subgroup row kernel walks four groups at a time
/// (`BWD_ROWS_R`).
const BF_FOUR_ROWS: u32 = 512;
/// Host-side only: the subgroup row kernel writes column sums
/// (`BWD_COLUMN_SUMS`).
const BF_COLUMN_SUMS: u32 = 1024;
/// Host-side only: the tensor is split across bindings (`BWD_CHUNKED`).
const BF_CHUNKED: u32 = 2048;
/// A later chunk of whole blocks adds its affine gradients to the earlier
/// chunks' instead of writing them ([`plan_blocks`]).
const BF_ACCUMULATE: u32 = 4096;
/// `bwd_empty_affine_grads`: dγ is NaN, not 0 (Keras's BatchNormalization
/// trained on an empty batch, whose γ gradient meets the NaN moments).
const BF_NAN_WEIGHT_GRAD: u32 = 8192;
/// Host-side only: x, grad_output and grad_input move as pairs of vectors,
/// one 16-byte access each (half storage, rows or runs of a multiple of 8
/// elements: `PAIRED_ACCESS`, backward_io_half_pairs.wgsl): the held-row
/// kernel's slots, the subgroup row and run kernels' loops.
const BF_PAIRS: u32 = 16384;
/// Host-side only: bits 24.. of the flags hold the held-row kernel's
/// vectors per lane (`HELD_K`), a pipeline constant like the flags above.
const BF_HELD_SHIFT: u32 = 24;

/// Most bytes of the scratch with per-step column sums
/// (`fused_column_sums`): WebGPU's default storage binding limit, which
/// every adapter offers.
const COLUMN_SUMS_MAX_BYTES: usize = 128 << 20;

/// The finalize step for `outputs` outputs with parameters `f`: serial
/// (one invocation per output, up to `serial_max` partials each:
/// [`kernels::FINALIZE_SERIAL_MAX`], or [`kernels::FINALIZE_SERIAL_MAX_CPU`]
/// on a CPU) or a workgroup per output. Few partials per output are the
/// common case (column sums, GroupNorm groups), and there a workgroup per
/// output spent its time at barriers: lavapipe paid ~10 µs per workgroup,
/// 20 ms for Keras GroupNorm's 2304 outputs. Returns its workgroups and
/// parameters.
fn finalize_step(outputs: usize, mut f: BwdParams, serial_max: u32) -> (usize, BwdParams) {
    let merged = if f.flags & BF_LOOP_P != 0 { f.rp } else { 1 };
    if f.tiles.saturating_mul(merged) <= serial_max {
        f.flags |= BF_SERIAL;
        (outputs.div_ceil(BWD_FINALIZE_WG as usize), f)
    } else {
        (outputs, f)
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
struct BwdParams {
    sp: u32,
    sa: u32,
    sg: u32,
    sb: u32,
    rp: u32,
    ra: u32,
    rg: u32,
    rb: u32,
    n_groups: u32,
    total: u32,
    tiles: u32,
    tile_len: u32,
    group_stride: u32,
    tile_stride: u32,
    partials_offset: u32,
    affine_div: u32,
    flags: u32,
    rows: u32,
    cols: u32,
    rows_per_block: u32,
    chunk_base: u32,
    chunk_len: u32,
    chunk_index: u32,
    chunk_span: u32,
    chunk_elems: u32,
    chunk_count: u32,
    group_offset: u32,
    _pad1: u32,
}

/// The uniform of one dispatch: the parameters and their divisors.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BwdUniform {
    params: BwdParams,
    divisors: [[u32; 4]; 6],
}

impl BwdParams {
    /// The uniform with divisors matching the fields (computed here, last,
    /// so every plan step's own view gets the right ones).
    fn uniform(&self) -> BwdUniform {
        let d = crate::engine::fast_divisor;
        BwdUniform {
            params: *self,
            divisors: [
                d(self.rb),
                d(self.sa * self.sg * self.sb),
                d(self.sb),
                d(self.sg),
                d(self.sg * self.sb),
                d(self.affine_div),
            ],
        }
    }
}

/// A planned dispatch with its parameters.
#[derive(Debug, Clone, Copy)]
struct Step {
    kernel: BackwardKernel,
    workgroups: usize,
    params: BwdParams,
    /// The chunk of x, grad_output and grad_input it binds (0 unless the
    /// tensor is split: [`plan_chunked`]).
    chunk: usize,
}

/// The whole plan: its steps and the vec4s of scratch they use.
struct Plan {
    steps: Vec<Step>,
    work_vec4: usize,
}

fn tiles_for(len: usize) -> usize {
    len.div_ceil(BWD_TILE as usize).max(1)
}

/// Whether the affine index of every element is its statistics channel g
/// (BatchNorm, InstanceNorm, GroupNorm with one channel per group).
fn affine_is_channel(v: &View) -> bool {
    v.affine_div.max(1) == v.b.max(1) && v.affine_len == v.g
}

/// Whether one workgroup reduces a whole group (contiguous groups; the
/// forward's row-kernel rule). Packed halves also need groups of even
/// length, so that no word of grad_input is shared by two workgroups.
fn uses_rows(v: &View, dtype: DType) -> bool {
    v.a == 1
        && (dtype == DType::F32 || v.b.is_multiple_of(2))
        && (v.b <= kernels::ROWS_MAX_LEN as usize
            || v.groups() >= kernels::ROWS_MIN_FOR_LONG as usize)
        && v.b <= kernels::ROWS_LONG_MAX as usize
}

/// Channels per group when the row kernels can sum each channel of a
/// contiguous group on its own (channels-first GroupNorm: a group is whole
/// channels of H·W elements, H·W a multiple of four, `BWD_AFFINE` 3), so
/// the affine gradients need no second read of the input.
fn row_channels(v: &View) -> Option<usize> {
    let d = v.affine_div.max(1);
    (v.a == 1
        && d > 1
        && d.is_multiple_of(4)
        && v.b.is_multiple_of(d)
        && v.affine_len == v.g * (v.b / d))
        .then_some(v.b / d)
}

/// Row blocks of the column kernel for `rows` rows.
///
/// At least enough blocks that none is longer than [`COLS_MAX_BLOCK_ROWS`]:
/// an invocation of the column kernel walks its block's rows, under
/// lavapipe's loop limit ([`kernels::LAVAPIPE_LOOP_LIMIT`]; the affine
/// gradients of a Keras GroupNorm over 2 channels of 17M pixels were off).
fn col_blocks(rows: usize) -> usize {
    (rows / COLS_MIN_ROWS).clamp(1, COLS_MAX_BLOCKS.max(rows.div_ceil(COLS_MAX_BLOCK_ROWS)))
}

/// Most rows one block of the column kernel walks.
const COLS_MAX_BLOCK_ROWS: usize = 16_384;

/// Whether the statistics are channels-last: each p is several rows of
/// L = SG·SB channels with γ per channel (BatchNorm over [N, ..., C] or
/// (N, C); Keras's GroupNormalization), rows of whole vectors. The
/// `Channel*` kernels then find each channel's statistics once per strip of
/// rows instead of per element.
fn uses_channel_columns(v: &View) -> bool {
    v.a > 1
        && v.affine_div.max(1) == 1
        && v.affine_len == v.g * v.b
        && (v.g * v.b).is_multiple_of(4)
}

/// Strips of two vectors (eight channels) of a channels-last row.
fn channel_strips(v: &View) -> usize {
    (v.g * v.b / 4).div_ceil(2)
}

/// Vectors per lane when the channels-last kernels hold their channels
/// ([`crate::engine::HELD_COLUMNS_BACKWARD`]).
fn held_channels(v: &View, caps: &Caps) -> Option<u32> {
    crate::engine::held_columns_per_lane(v.g * v.b, caps, crate::engine::HELD_COLUMNS_BACKWARD)
}

/// Whether the subgroup row kernel takes a backward the row kernel takes.
fn uses_subgroup_rows(v: &View, caps: &Caps) -> bool {
    caps.subgroups && v.b.is_multiple_of(4)
}

/// Vectors per lane when the held-row kernel takes a backward the subgroup
/// row kernel takes: the forward held the rows ([`crate::engine::held_vectors`]),
/// γ is one per column, and no per-channel partials are wanted.
fn held_rows(v: &View, caps: &Caps, row_grads: u32) -> Option<u32> {
    crate::engine::held_vectors(v, caps).filter(|_| v.affine_div <= 1 && row_grads == 0)
}

/// Most channels per group the workgroup-held backward takes when it
/// writes per-channel partials: one workgroup sum (two barriers) each.
const WORKGROUP_HELD_CHANNELS: usize = 16;

/// Vectors per invocation when the workgroup-held row kernel takes a
/// backward the subgroup row kernel takes: the forward held the rows in a
/// workgroup ([`crate::engine::workgroup_held_vectors`]), groups have at
/// most [`WORKGROUP_HELD_CHANNELS`] channels of their own γ
/// (`channels_per_group`, [`row_channels`]), and the module has its
/// subgroup part, where the kernel's helpers live.
fn workgroup_held_rows(v: &View, caps: &Caps, channels_per_group: Option<usize>) -> Option<u32> {
    crate::engine::workgroup_held_vectors(v, caps)
        .filter(|_| caps.subgroups && channels_per_group.unwrap_or(1) <= WORKGROUP_HELD_CHANNELS)
}

/// Whether a GPU's backward spreads contiguous groups over tiles instead of
/// giving each a subgroup of the row kernel: fewer groups than a GPU keeps
/// busy ([`kernels::ROWS_SG_MIN_STEPS_GPU`] subgroups), each at least two
/// tiles long, and no held-row kernel for them (InstanceNorm 8x64x128x130
/// would be 512 subgroups, a few per multiprocessor, against 2560
/// workgroups of tiles). The tiled passes read x and dy twice, as the
/// subgroup row kernel does, unless the row kernel's per-channel sums would
/// have given the affine gradients of channels that are not the groups
/// (channels-first GroupNorm): tiles would read them a third time, so
/// those keep the row kernel.
fn tiles_fill_gpu(
    v: &View,
    caps: &Caps,
    row_grads: u32,
    per_channel: bool,
    channels_per_group: Option<usize>,
) -> bool {
    !caps.cpu
        && (per_channel || row_grads == 0)
        && uses_subgroup_rows(v, caps)
        && v.groups() < kernels::ROWS_SG_MIN_STEPS_GPU
        && v.group_len() >= 2 * BWD_TILE as usize
        && held_rows(v, caps, row_grads).is_none()
        && workgroup_held_rows(v, caps, channels_per_group).is_none()
}

/// Whether the subgroup row kernel, walking four rows at a time in `steps`
/// steps, also writes per-step column sums for dγ and dβ (one parameter per column),
/// finished by [`BackwardKernel::ColumnSums`]. CPU adapters only: that last
/// pass has one invocation per four columns, which fills a CPU but not a
/// GPU (there the column kernel's row blocks keep thousands busy).
fn fused_column_sums(v: &View, caps: &Caps, params_wanted: bool, steps: usize) -> bool {
    caps.cpu
        && params_wanted
        && v.affine_div <= 1
        && (v.groups() + 16 * (v.b / 4).div_ceil(8) * steps) * 16 <= COLUMN_SUMS_MAX_BYTES
        // bwd_column_sums loops over the steps (and their blocks of 32):
        // under lavapipe's loop limit, with room to spare (LayerNorm of
        // rows of 4 over 4M rows lost its dγ and dβ past it).
        && steps <= kernels::LAVAPIPE_LOOP_LIMIT / 2
}

/// The parameters every step of `spec`'s plan starts from (the stats view
/// as the reduction view, the whole tensor bound), and the flags of the
/// affine gradients wanted.
fn base_params(spec: &BackwardSpec) -> (BwdParams, u32) {
    let v = &spec.view;
    let groups = v.groups();
    let mut base_flags = 0;
    if spec.weight {
        base_flags |= BF_WEIGHT;
    }
    if spec.rms {
        base_flags |= BF_RMS;
    }
    let mut grad_flags = 0;
    if spec.grad_weight {
        grad_flags |= BF_GRAD_WEIGHT;
    }
    if spec.grad_bias {
        grad_flags |= BF_GRAD_BIAS;
    }
    let base = BwdParams {
        sp: v.p as u32,
        sa: v.a as u32,
        sg: v.g as u32,
        sb: v.b as u32,
        rp: v.p as u32,
        ra: v.a as u32,
        rg: v.g as u32,
        rb: v.b as u32,
        n_groups: groups as u32,
        total: v.numel() as u32,
        tiles: 1,
        tile_len: BWD_TILE,
        group_stride: 1,
        tile_stride: 1,
        partials_offset: groups as u32,
        affine_div: v.affine_div.max(1) as u32,
        flags: base_flags,
        rows: (v.p * v.a) as u32,
        cols: (v.g * v.b) as u32,
        rows_per_block: 1,
        chunk_base: 0,
        chunk_len: v.numel() as u32,
        chunk_index: 0,
        chunk_span: 1,
        chunk_elems: v.numel().max(1) as u32,
        chunk_count: 1,
        group_offset: 0,
        _pad1: 0,
    };
    (base, grad_flags)
}

/// The finalize steps over per-group partials, as (flags, outputs): the
/// group sums (batch statistics) and, where the affine index is the
/// channel, the affine gradients summed over samples. One step does both
/// where each channel has one group (P = 1); else the sums are their own
/// step, so that no workgroup writes the sums of several groups.
fn finishes(batch: bool, channel_grads: u32, v: &View) -> Vec<(u32, usize)> {
    let sums = if batch { BF_WRITE_GSUM } else { 0 };
    match (channel_grads != 0, v.p > 1 && batch) {
        (false, _) => vec![(sums, v.groups())],
        (true, false) => vec![(sums | BF_LOOP_P | channel_grads, v.g)],
        (true, true) => vec![
            (BF_WRITE_GSUM, v.groups()),
            (BF_LOOP_P | channel_grads, v.g),
        ],
    }
}

/// The plan for a tensor bound in `chunks`: [`plan_with`]'s when it fits
/// one binding, else [`plan_chunked`]'s.
fn plan_for(spec: &BackwardSpec, caps: &Caps, chunks: &Chunks) -> Plan {
    if chunks.whole_blocks {
        plan_blocks(spec, caps, chunks)
    } else if chunks.count > 1 && spec.view.numel() > 0 {
        plan_chunked(spec, caps, chunks)
    } else {
        plan_with(spec, caps, false)
    }
}

/// How x, grad_output and grad_input are split for `ctx`'s binding limit:
/// between outer blocks (rows, samples) where an aligned run of them fits
/// ([`Chunks::of_blocks`], as the forward splits them where its blocks are
/// independent; a backward's always are, its only sums across blocks being
/// the affine gradients), else in element ranges ([`plan_chunked`]).
fn chunks_for(ctx: &Context, spec: &BackwardSpec) -> Chunks {
    let v = &spec.view;
    let elements = Chunks::new(v.numel(), spec.dtype, ctx.max_storage_binding());
    if elements.count > 1 {
        if let Some(blocks) = Chunks::of_blocks(
            v,
            spec.dtype,
            ctx.max_storage_binding(),
            ctx.storage_offset_alignment(),
        ) {
            return blocks;
        }
    }
    elements
}

/// The plan of a tensor split into chunks of whole blocks: each chunk's
/// blocks are a tensor of their own (their statistics bound at their first
/// group), so each runs the plan of a tensor in one binding, with the fast
/// kernels; from the second chunk on, the affine gradients are added to the
/// chunks' before (`BF_ACCUMULATE`). The chunks run one after the other and
/// share the scratch.
fn plan_blocks(spec: &BackwardSpec, caps: &Caps, chunks: &Chunks) -> Plan {
    let mut steps = Vec::new();
    let mut work_vec4 = 1;
    for c in 0..chunks.count {
        let chunk = BackwardSpec {
            view: chunks.block_view(&spec.view, c),
            ..*spec
        };
        let plan = plan_with(&chunk, caps, false);
        work_vec4 = work_vec4.max(plan.work_vec4);
        steps.extend(plan.steps.into_iter().map(|mut step| {
            step.chunk = c;
            if c > 0 {
                step.params.flags |= BF_ACCUMULATE;
            }
            step
        }));
    }
    Plan { steps, work_vec4 }
}

/// The plan of a tensor larger than one storage binding, bound chunk by
/// chunk (as the forward's: [`Chunks`]): the generic kernels only, in
/// their scalar form (`BWD_CHUNKED`), each pass once per chunk over the
/// chunk's elements. Tiles are the unsplit plan's; each chunk writes its
/// own partial of every tile of the groups it reaches (zeros where the
/// tile has no element in it), and the finalize merges a group's tiles of
/// the chunks it reaches ([`crate::engine::chunk_span`]: about two for
/// small groups, so their scratch does not grow with the chunks). The affine
/// gradients of an index per column (or per D columns) reduce the
/// `[1, R, K, D]` view the same way.
fn plan_chunked(spec: &BackwardSpec, caps: &Caps, chunks: &Chunks) -> Plan {
    let v = &spec.view;
    let numel = v.numel();
    let groups = v.groups();
    let (mut base, grad_flags) = base_params(spec);
    base.flags |= BF_CHUNKED;
    let per_channel = affine_is_channel(v);
    let channel_grads = if per_channel { grad_flags } else { 0 };
    let batch = spec.source == StatsSource::Batch;
    let serial_max = caps.cpu_or_gpu(
        kernels::FINALIZE_SERIAL_MAX_CPU,
        kernels::FINALIZE_SERIAL_MAX,
    );
    let count = chunks.count;
    let mut steps = Vec::new();
    let mut work_vec4 = groups;
    base.chunk_elems = chunks.elems as u32;
    base.chunk_count = count as u32;
    let in_chunk = |mut p: BwdParams, c: usize| {
        let (lo, hi) = chunks.range(c, numel);
        p.chunk_base = lo as u32;
        p.chunk_len = (hi - lo) as u32;
        p.chunk_index = c as u32;
        p
    };
    // Partials of reduction view `p` (tiles per group, for each of the
    // chunks a group reaches: bwd_chunk_slot), one dispatch per chunk,
    // then a finalize over them for each of `finishes` (flags, outputs).
    let reduce = |steps: &mut Vec<Step>, p: BwdParams, finishes: &[(u32, usize)]| {
        let tiles = p.tiles as usize;
        let reductions = p.n_groups as usize;
        let reduction_view = View {
            p: p.rp as usize,
            a: p.ra as usize,
            g: p.rg as usize,
            b: p.rb as usize,
            affine_div: 1,
            affine_len: 1,
        };
        let span = crate::engine::chunk_span(&reduction_view, chunks);
        let mut p = p;
        p.chunk_span = span as u32;
        p.group_stride = (tiles * span) as u32;
        for c in 0..count {
            let mut pc = in_chunk(p, c);
            // Contiguous groups: those with elements in the chunk (the
            // recording clears the other slots first).
            let (first, end) = crate::engine::chunk_groups(&reduction_view, chunks, c);
            pc.group_offset = first as u32;
            steps.push(Step {
                kernel: BackwardKernel::Partials,
                workgroups: (end - first) * tiles,
                params: pc,
                chunk: c,
            });
        }
        for &(finish, outputs) in finishes {
            let mut f = p;
            f.tiles = (tiles * span) as u32;
            f.flags |= finish;
            let (workgroups, f) = finalize_step(outputs, f, serial_max);
            steps.push(Step {
                kernel: BackwardKernel::Finalize,
                workgroups,
                params: f,
                chunk: 0,
            });
        }
        p.partials_offset as usize + reductions * tiles * span
    };
    if batch || channel_grads != 0 {
        let mut p = base;
        p.tiles = tiles_for(v.group_len()) as u32;
        work_vec4 = work_vec4.max(reduce(&mut steps, p, &finishes(batch, channel_grads, v)));
    }
    let mut d = base;
    if !batch {
        d.flags |= BF_RUNNING;
    }
    for c in 0..count {
        let dc = in_chunk(d, c);
        let per_workgroup = (BWD_WG * BWD_DX_PER_THREAD) as usize;
        steps.push(Step {
            kernel: BackwardKernel::GradInput,
            workgroups: (dc.chunk_len as usize).div_ceil(per_workgroup),
            params: dc,
            chunk: c,
        });
    }
    if grad_flags != 0 && !per_channel {
        // Affine index k covers D contiguous elements of each row: the
        // [1, R, K, D] view (D = 1 for an index per column).
        let (rows, k, d) = (v.p * v.a, v.affine_len, v.affine_div.max(1));
        let mut p = base;
        p.rp = 1;
        p.ra = rows as u32;
        p.rg = k as u32;
        p.rb = d as u32;
        p.n_groups = k as u32;
        p.tiles = tiles_for(rows * d) as u32;
        // Its partials after the group sums' (not over them, as the
        // unsplit plan does): a chunk's dispatch skips the columns without
        // elements in it, whose slots must still read the zeros of the
        // clear before the pass.
        p.partials_offset = work_vec4 as u32;
        work_vec4 = reduce(&mut steps, p, &[(BF_LOOP_P | grad_flags, k)]);
    }
    Plan { steps, work_vec4 }
}

/// The plan of an empty input: nothing but its affine gradients, sums over
/// no element, written because the caller's buffers need not be zeroed
/// (`nan_weight_grad`: a NaN dγ, where the forward's empty batch made the
/// moments NaN, as Keras's BatchNormalization does).
fn plan_empty(spec: &BackwardSpec, grads: &Gradients, nan_weight_grad: bool) -> Plan {
    let (mut params, grad_flags) = base_params(spec);
    let count = [grads.grad_weight.as_ref(), grads.grad_bias.as_ref()]
        .into_iter()
        .flatten()
        .map(GpuTensor::numel)
        .max()
        .unwrap_or(0);
    let mut steps = Vec::new();
    if grad_flags != 0 && count > 0 {
        params.cols = count as u32;
        params.flags |= grad_flags;
        if nan_weight_grad {
            params.flags |= BF_NAN_WEIGHT_GRAD;
        }
        steps.push(Step {
            kernel: BackwardKernel::EmptyAffineGrads,
            workgroups: count.div_ceil(BWD_WG as usize),
            params,
            chunk: 0,
        });
    }
    Plan {
        steps,
        work_vec4: 1,
    }
}

/// The plan; `tiled` keeps groups off the row kernel so that grad_input is
/// its own dispatch (needed when the group sums come from elsewhere).
fn plan_with(spec: &BackwardSpec, caps: &Caps, tiled: bool) -> Plan {
    let v = &spec.view;
    let mut steps = Vec::new();
    let mut work_vec4 = 0usize;
    if v.numel() == 0 {
        return Plan {
            steps,
            work_vec4: 1,
        };
    }
    let groups = v.groups();
    let (base, grad_flags) = base_params(spec);
    let base_flags = base.flags;
    let params_wanted = grad_flags != 0;
    let per_channel = affine_is_channel(v);
    let finalize_serial_max = caps.cpu_or_gpu(
        kernels::FINALIZE_SERIAL_MAX_CPU,
        kernels::FINALIZE_SERIAL_MAX,
    );
    let mut push = |kernel, workgroups: usize, params: BwdParams| {
        let (workgroups, params) = if kernel == BackwardKernel::Finalize {
            finalize_step(workgroups, params, finalize_serial_max)
        } else {
            (workgroups, params)
        };
        steps.push(Step {
            kernel,
            workgroups,
            params,
            chunk: 0,
        })
    };
    // Per-group sums, grad_input, and the affine gradients when the affine
    // index is the channel.
    let channel_grads = if per_channel { grad_flags } else { 0 };
    // Whether the affine gradients already come out of the group sums.
    let mut grads_done = false;
    let rows = v.p * v.a;
    let cols = v.g * v.b;
    if uses_channel_columns(v) {
        let batch = spec.source == StatsSource::Batch;
        let strips = channel_strips(v);
        let samples = v.p;
        // A channel kernel over `blocks` row blocks of each p: invocations
        // owning strips of them, or subgroups walking them whole.
        let held = held_channels(v, caps);
        let channel_step = |strip_kernel, held_kernel, blocks: usize, mut d: BwdParams| match held {
            Some(k) => {
                d.flags |= k << BF_HELD_SHIFT;
                (
                    held_kernel,
                    crate::engine::subgroup_workgroups(samples * blocks, caps),
                    d,
                )
            }
            None => (
                strip_kernel,
                (samples * blocks * strips).div_ceil(BWD_WG as usize),
                d,
            ),
        };
        if batch || grad_flags != 0 {
            let invocations = caps.cpu_or_gpu(CHANNEL_INVOCATIONS_CPU, CHANNEL_INVOCATIONS);
            let max_blocks = caps.cpu_or_gpu(1, COLS_MAX_BLOCKS);
            let cap = (max_blocks.max(invocations / strips) / samples).max(1);
            let blocks = (v.a / COLS_MIN_ROWS).clamp(1, cap);
            let mut c = base;
            c.flags |= grad_flags;
            if batch {
                c.flags |= BF_WRITE_GSUM;
            }
            c.tiles = blocks as u32;
            c.rows_per_block = v.a.div_ceil(blocks) as u32;
            let (kernel, workgroups, c) = channel_step(
                BackwardKernel::ChannelCols,
                BackwardKernel::ChannelColsHeld,
                blocks,
                c,
            );
            push(kernel, workgroups, c);
            // The kernel writes the results itself with one p, one channel
            // per group and one block; otherwise partials per (p, channel,
            // block), merged per group (over its channels and blocks) and
            // per channel (over every p and block).
            let one_channel_groups = v.p == 1 && v.b == 1;
            if !(one_channel_groups && blocks == 1) {
                work_vec4 = work_vec4.max(groups + samples * cols * blocks);
                let mut per_channel = base;
                per_channel.flags |= BF_LOOP_P | grad_flags;
                per_channel.rg = cols as u32;
                per_channel.tiles = blocks as u32;
                per_channel.group_stride = blocks as u32;
                if one_channel_groups {
                    // A group is a channel: one merge gives both.
                    if batch {
                        per_channel.flags |= BF_WRITE_GSUM;
                    }
                } else if batch {
                    let mut per_group = base;
                    per_group.flags |= BF_WRITE_GSUM;
                    per_group.tiles = (v.b * blocks) as u32;
                    per_group.group_stride = per_group.tiles;
                    push(BackwardKernel::Finalize, groups, per_group);
                }
                if grad_flags != 0 || (one_channel_groups && batch) {
                    push(BackwardKernel::Finalize, cols, per_channel);
                }
            }
        }
        let dx_rows = caps.cpu_or_gpu(CHANNEL_DX_ROWS_CPU, CHANNEL_DX_ROWS);
        let blocks = v.a.div_ceil(dx_rows);
        let mut d = base;
        if !batch {
            d.flags |= BF_RUNNING;
        }
        d.tiles = blocks as u32;
        d.rows_per_block = dx_rows as u32;
        let (kernel, workgroups, d) = channel_step(
            BackwardKernel::ChannelGradInput,
            BackwardKernel::ChannelGradInputHeld,
            blocks,
            d,
        );
        push(kernel, workgroups, d);
        return Plan {
            steps,
            work_vec4: work_vec4.max(groups),
        };
    }
    // The row kernels write each channel's sums as its partial when groups
    // are whole channels; Finalize sums them over samples.
    let channels_per_group = if per_channel {
        Some(1)
    } else {
        row_channels(v)
    };
    let row_grads = if channels_per_group.is_some() {
        grad_flags
    } else {
        0
    };
    match spec.source {
        StatsSource::Batch
            if uses_rows(v, spec.dtype)
                && !tiled
                && !tiles_fill_gpu(v, caps, row_grads, per_channel, channels_per_group) =>
        {
            let mut p = base;
            if row_grads != 0 {
                p.flags |= BF_WRITE_PARTIALS;
                grads_done = true;
            }
            // The subgroup row kernel and the steps whose column sums it
            // writes, when it does.
            let subgroup_rows = if let Some(held) = held_rows(v, caps, row_grads) {
                // Blocks of contiguous rows, a subgroup of the smallest
                // size for each (the forward's sizing); with larger
                // subgroups some take several.
                let per_block = crate::engine::subgroup_block(groups, caps);
                let blocks = groups.div_ceil(per_block);
                let (held, pairs) = crate::engine::paired_slots(held, v.b, spec.dtype);
                p.flags |= held << BF_HELD_SHIFT;
                if pairs {
                    p.flags |= BF_PAIRS;
                }
                p.tiles = blocks as u32;
                p.rows_per_block = per_block as u32;
                let column_sums = fused_column_sums(v, caps, params_wanted, blocks);
                Some((
                    BackwardKernel::RowsHeld,
                    crate::engine::block_workgroups(groups, caps),
                    column_sums.then_some(blocks),
                ))
            } else if let Some(held) = workgroup_held_rows(v, caps, channels_per_group) {
                // A workgroup per row; per-channel partials where the
                // channels have their own γ, else dγ and dβ come from the
                // column kernel.
                p.flags |= held << BF_HELD_SHIFT;
                Some((BackwardKernel::RowsWorkgroupHeld, groups, None))
            } else if uses_subgroup_rows(v, caps) {
                // Enough workgroups for the largest subgroup size; with
                // smaller subgroups the surplus workgroups find no group.
                // Four groups per step where the forward takes four rows
                // and no per-channel partials are written.
                let mut per_wg = (BWD_SG_WG / caps.subgroup_max.max(1)).max(1) as usize;
                let step = crate::engine::rows_per_step(v, caps) as usize;
                let four_rows = step > 1 && row_grads == 0;
                let steps = groups.div_ceil(step);
                let column_sums = four_rows && fused_column_sums(v, caps, params_wanted, steps);
                if four_rows {
                    p.flags |= BF_FOUR_ROWS;
                    per_wg *= step;
                }
                // Half groups of whole pairs of vectors move them in one
                // access each where the kernel's channels (its loops over
                // one γ each, or the whole group) are whole pairs too, one
                // group per step: with four, pairs doubled the unrolled
                // loop (46 KB of machine code against 29) and LayerNorm f16
                // 1024x16384 went from 3.50 to 3.70 times the copy kernel.
                let channel = match Specialization::of(&p).affine {
                    1 | 3 => p.affine_div,
                    _ => p.sb,
                };
                if !four_rows
                    && crate::engine::whole_pairs(v.b, spec.dtype)
                    && crate::engine::whole_pairs(channel as usize, spec.dtype)
                {
                    p.flags |= BF_PAIRS;
                }
                Some((
                    BackwardKernel::RowsSubgroup,
                    groups.div_ceil(per_wg),
                    column_sums.then_some(steps),
                ))
            } else {
                None
            };
            match subgroup_rows {
                Some((kernel, workgroups, column_steps)) => {
                    if let Some(steps) = column_steps {
                        p.flags |= BF_COLUMN_SUMS;
                        p.tiles = steps as u32;
                    }
                    push(kernel, workgroups, p);
                    if let Some(steps) = column_steps {
                        let mut c = base;
                        c.flags |= grad_flags;
                        c.tiles = steps as u32;
                        push(
                            BackwardKernel::ColumnSums,
                            (v.b / 4).div_ceil(BWD_WG as usize),
                            c,
                        );
                        // Blocks of eight vectors (column_sums_slot).
                        let blocks = (v.b / 4).div_ceil(8);
                        work_vec4 = work_vec4.max(groups + 16 * blocks * steps);
                        grads_done = true;
                    }
                }
                None => push(BackwardKernel::Rows, groups, p),
            }
            let channels = v.g * channels_per_group.unwrap_or(1);
            work_vec4 = work_vec4.max(groups + v.p * channels);
            if row_grads != 0 {
                let mut f = base;
                f.flags |= BF_LOOP_P | row_grads;
                f.rg = channels as u32;
                push(BackwardKernel::Finalize, channels, f);
            }
        }
        source => {
            let batch = source == StatsSource::Batch;
            let on_subgroups = runs_on_subgroups(&base, caps);
            let run_pairs = crate::engine::whole_pairs(base.sb as usize, spec.dtype);
            let runs = v.numel() / v.b.max(1);
            if batch || channel_grads != 0 {
                let tiles = tiles_for(v.group_len());
                let mut p = base;
                p.tiles = tiles as u32;
                // One partial per invocation where groups span whole tiles
                // (so the partials stay within 1/8 of the input).
                let each = dx_by_runs(&p) && v.group_len() >= BWD_TILE as usize;
                // Half runs of whole pairs move them in one access each.
                if on_subgroups && run_pairs {
                    p.flags |= BF_PAIRS;
                }
                let (kernel, workgroups, per_group) = if on_subgroups {
                    // A partial per run: SA per group.
                    let workgroups = crate::engine::block_workgroups(runs, caps);
                    (BackwardKernel::PartialsRuns, workgroups, v.a)
                } else if each {
                    let per_group = tiles * BWD_WG as usize;
                    (BackwardKernel::PartialsEach, groups * tiles, per_group)
                } else {
                    (BackwardKernel::Partials, groups * tiles, tiles)
                };
                p.group_stride = per_group as u32;
                push(kernel, workgroups, p);
                work_vec4 = work_vec4.max(groups + groups * per_group);
                let mut f = p;
                f.flags &= !BF_PAIRS;
                f.tiles = per_group as u32;
                for (finish, outputs) in finishes(batch, channel_grads, v) {
                    let mut f = f;
                    f.flags |= finish;
                    push(BackwardKernel::Finalize, outputs, f);
                }
            }
            let mut d = base;
            if !batch {
                d.flags |= BF_RUNNING;
            }
            if on_subgroups {
                if run_pairs {
                    d.flags |= BF_PAIRS;
                }
                let workgroups = crate::engine::block_workgroups(runs, caps);
                push(BackwardKernel::GradInputRuns, workgroups, d);
            } else {
                let (workgroups, d) = grad_input_step(d);
                push(BackwardKernel::GradInput, workgroups, d);
            }
        }
    }
    if params_wanted && !per_channel && !grads_done {
        if v.affine_div.max(1) == 1 {
            // One affine index per column: coalesced column sums.
            let blocks = col_blocks(rows);
            let mut c = base;
            c.flags |= grad_flags;
            c.tiles = blocks as u32;
            c.rows_per_block = rows.div_ceil(blocks) as u32;
            c.group_stride = 1;
            c.tile_stride = cols as u32;
            // Columns per invocation (bwd_cols): 8 (two vectors) when runs
            // are whole pairs of vectors, 4 when whole vectors, else 1.
            let per_invocation = if c.sb.is_multiple_of(8) {
                8
            } else if vec4_runs(&c) {
                4
            } else {
                1
            };
            let col_invocations = cols / per_invocation;
            push(
                BackwardKernel::Cols,
                blocks * col_invocations.div_ceil(BWD_WG as usize),
                c,
            );
            if blocks > 1 {
                work_vec4 = work_vec4.max(groups + blocks * cols);
                let mut f = c;
                f.flags = base_flags | grad_flags | BF_LOOP_P;
                f.rp = 1;
                f.ra = 1;
                f.rg = cols as u32;
                f.rb = 1;
                f.n_groups = cols as u32;
                push(BackwardKernel::Finalize, cols, f);
            }
        } else {
            // Affine index k covers D contiguous elements of each row: reduce
            // the [1, R, K, D] view in tiles.
            let k = v.affine_len;
            let d = v.affine_div;
            let tiles = tiles_for(rows * d);
            let mut p = base;
            p.rp = 1;
            p.ra = rows as u32;
            p.rg = k as u32;
            p.rb = d as u32;
            p.n_groups = k as u32;
            p.tiles = tiles as u32;
            p.group_stride = tiles as u32;
            push(BackwardKernel::Partials, k * tiles, p);
            work_vec4 = work_vec4.max(groups + k * tiles);
            let mut f = p;
            f.flags |= BF_LOOP_P | grad_flags;
            push(BackwardKernel::Finalize, k, f);
        }
    }
    Plan {
        steps,
        work_vec4: work_vec4.max(1),
    }
}

/// The dispatches of one backward pass, in order, on an adapter with no
/// optional capabilities ([`Caps::baseline`]).
pub fn plan_backward(spec: &BackwardSpec) -> Vec<Dispatch> {
    plan_backward_on(spec, &Caps::baseline())
}

/// The dispatches of one backward pass on an adapter with `caps`, in order.
pub fn plan_backward_on(spec: &BackwardSpec, caps: &Caps) -> Vec<Dispatch> {
    plan_with(spec, caps, false)
        .steps
        .iter()
        .map(|s| Dispatch {
            kernel: s.kernel,
            workgroups: s.workgroups as u32,
        })
        .collect()
}

/// Gradients of one backward pass (torch's autograd results).
#[derive(Debug, Clone)]
pub struct Gradients {
    /// ∂L/∂x, the input's shape and dtype.
    pub grad_input: GpuTensor,
    /// ∂L/∂γ, when the layer has γ.
    pub grad_weight: Option<GpuTensor>,
    /// ∂L/∂β, when the layer has β.
    pub grad_bias: Option<GpuTensor>,
}

impl Gradients {
    /// Zero-filled gradients for the backward of a forward of input `shape`
    /// and `dtype` through parameters `affine`: what `record_backward`
    /// allocates per call, and what `record_backward_into` takes (allocate
    /// them once, reuse them every step).
    pub fn zeros(ctx: &Context, shape: &[usize], dtype: DType, affine: &Affine) -> Result<Self> {
        // Gradients of parameters have the parameter's shape and dtype.
        let param = |t: &Option<GpuTensor>| -> Result<Option<GpuTensor>> {
            t.as_ref()
                .map(|t| ctx.zeros(t.shape(), t.dtype()))
                .transpose()
        };
        Ok(Gradients {
            grad_input: ctx.zeros(shape, dtype)?,
            grad_weight: param(&affine.weight)?,
            grad_bias: param(&affine.bias)?,
        })
    }
}

/// Pipelines and layout of the backward kernels, built once per context:
/// x (1), grad_output (2), γ (3) and the saved statistics (4) read;
/// grad_input (5), dγ (6), dβ (7) and the scratch (8) written.
pub(crate) struct BackwardCache {
    set: kernels::PipelineSet<(BackwardKernel, Specialization)>,
    /// Placeholders for absent weight / gradients (distinct buffers, so no
    /// two writable bindings of one dispatch alias).
    dummies: [wgpu::Buffer; 3],
    /// The scratch of the backward passes, shared by all of them and grown
    /// as needed: each pass writes every slot it reads before reading it,
    /// and passes run in the order they were recorded and submitted, so
    /// none sees another's values (a fresh buffer per pass also cost
    /// wgpu's zero-fill each time).
    work: std::sync::Mutex<Option<wgpu::Buffer>>,
}

impl std::fmt::Debug for BackwardCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackwardCache")
    }
}

impl BackwardCache {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        let dummies = std::array::from_fn(|i| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("gpunorm backward placeholder {i}")),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        });
        BackwardCache {
            work: std::sync::Mutex::new(None),
            set: kernels::PipelineSet::new(
                device,
                "gpunorm backward",
                [false, false, false, false, true, true, true, true],
            ),
            dummies,
        }
    }

    /// The shared scratch, at least `bytes` long.
    fn work_buffer(&self, ctx: &Context, bytes: u64) -> Result<wgpu::Buffer> {
        let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        match work.as_ref() {
            Some(buffer) if buffer.size() >= bytes => Ok(buffer.clone()),
            _ => {
                let buffer = ctx.create_buffer("gpunorm backward scratch", bytes)?;
                *work = Some(buffer.clone());
                Ok(buffer)
            }
        }
    }

    fn get(
        &self,
        device: &wgpu::Device,
        kernel: BackwardKernel,
        params: &BwdParams,
        dtype: DType,
    ) -> Arc<wgpu::ComputePipeline> {
        let special = Specialization::of(params);
        let entry_point = if kernel == BackwardKernel::Finalize && special.serial {
            "bwd_finalize_serial"
        } else {
            kernel.entry_point()
        };
        self.set.get(
            device,
            (kernel, special),
            dtype,
            entry_point,
            &special.constants(),
            || source(dtype, kernel.uses_subgroups(), special.paired),
        )
    }
}

/// The pipeline constants of a backward dispatch (`backward_common.wgsl`):
/// the flags that per-element code tests, and the affine layout of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Specialization {
    weight: bool,
    rms: bool,
    running: bool,
    /// 0: one parameter per element, 1: one per run of SB, 3: one per a
    /// multiple of four elements dividing SB, 2: other.
    affine: u8,
    /// Runs of SB are whole vectors ([`vec4_runs`]).
    vec4: bool,
    /// A finalize step merges serially (`bwd_finalize_serial`).
    serial: bool,
    /// x, grad_output and grad_input are bound chunk by chunk
    /// (`BWD_CHUNKED`).
    chunked: bool,
    /// Groups the subgroup row kernel walks at a time (`BWD_ROWS_R`).
    rows_step: u8,
    /// The subgroup row kernel writes column sums (`BWD_COLUMN_SUMS`).
    column_sums: bool,
    /// Vectors per lane of the held-row kernel (`HELD_K`), 0 elsewhere.
    held: u8,
    /// x, grad_output and grad_input move in pairs of vectors ([`BF_PAIRS`];
    /// not an override: it picks the io source, [`source`]).
    paired: bool,
}

impl Specialization {
    fn of(p: &BwdParams) -> Specialization {
        let affine = if p.affine_div <= 1 {
            0
        } else if p.affine_div == p.sb {
            1
        } else if p.affine_div.is_multiple_of(4) && p.sb.is_multiple_of(p.affine_div) {
            // Runs are whole channels of a multiple of four elements (the
            // row kernels sum channel by channel).
            3
        } else {
            2
        };
        Specialization {
            weight: p.flags & BF_WEIGHT != 0,
            rms: p.flags & BF_RMS != 0,
            running: p.flags & BF_RUNNING != 0,
            affine,
            vec4: vec4_runs(p) && p.flags & BF_CHUNKED == 0,
            chunked: p.flags & BF_CHUNKED != 0,
            serial: p.flags & BF_SERIAL != 0,
            rows_step: if p.flags & BF_FOUR_ROWS != 0 {
                kernels::ROWS_SG_STEP as u8
            } else {
                1
            },
            column_sums: p.flags & BF_COLUMN_SUMS != 0,
            held: (p.flags >> BF_HELD_SHIFT) as u8,
            paired: p.flags & BF_PAIRS != 0,
        }
    }

    fn constants(&self) -> [(&'static str, f64); 9] {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        [
            ("BWD_WEIGHT", flag(self.weight)),
            ("BWD_RMS", flag(self.rms)),
            ("BWD_RUNNING", flag(self.running)),
            ("BWD_AFFINE", self.affine as f64),
            ("BWD_VEC4", flag(self.vec4)),
            ("BWD_ROWS_R", self.rows_step as f64),
            ("BWD_COLUMN_SUMS", flag(self.column_sums)),
            ("HELD_K", self.held as f64),
            ("BWD_CHUNKED", flag(self.chunked)),
        ]
    }
}

fn to_u32(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::TooLarge {
        what: what.to_string(),
        bytes: n as u64,
        limit: u32::MAX as u64,
        limit_name: "u32 element indexing",
    })
}

/// Checks `dy` against the saved forward and returns the spec of its
/// backward. Errors (never panics) when no forward ran or `dy` differs from
/// the forward's input in shape or dtype.
pub(crate) fn spec_for(
    saved: Option<&Saved>,
    affine: &Affine,
    dy: &GpuTensor,
) -> Result<(BackwardSpec, GpuTensor)> {
    let saved = saved.ok_or_else(|| {
        Error::State("backward was called before any forward: run forward (or record) first".into())
    })?;
    let x = &saved.x;
    if dy.shape() != x.shape() {
        return Err(Error::Shape(format!(
            "expected grad_output of shape {:?} (the forward's input), got {:?}",
            x.shape(),
            dy.shape()
        )));
    }
    if dy.dtype() != x.dtype() {
        return Err(Error::Dtype(format!(
            "expected grad_output of dtype {} (the forward's input), got {}",
            x.dtype(),
            dy.dtype()
        )));
    }
    let v = saved.spec.view;
    for (name, t) in [("weight", &affine.weight), ("bias", &affine.bias)] {
        if let Some(t) = t {
            if t.numel() != v.affine_len {
                return Err(Error::Shape(format!(
                    "expected {name} of {} elements for the backward pass, got shape {:?}",
                    v.affine_len,
                    t.shape(),
                )));
            }
        }
    }
    Ok((
        BackwardSpec {
            view: v,
            dtype: x.dtype(),
            rms: saved.spec.rms,
            source: saved.spec.source,
            weight: affine.weight.is_some(),
            grad_weight: affine.weight.is_some(),
            grad_bias: affine.bias.is_some(),
        },
        x.clone(),
    ))
}

/// Records the backward of the saved forward into `encoder`, allocating the
/// gradients. Nothing is submitted.
pub(crate) fn record_backward(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    saved: Option<&Saved>,
    affine: &Affine,
    dy: &GpuTensor,
) -> Result<(Gradients, Vec<Dispatch>)> {
    record_backward_with(ctx, encoder, saved, affine, dy, None)
}

/// The grad_input-only plan of a backward whose per-group sums are given.
fn plan_preset_sums(spec: &BackwardSpec, groups: usize, chunks: &Chunks) -> Plan {
    let mut full = if chunks.count > 1 && spec.view.numel() > 0 {
        plan_chunked(spec, &Caps::baseline(), chunks)
    } else {
        plan_with(spec, &Caps::baseline(), true)
    };
    full.steps.retain(|s| {
        matches!(
            s.kernel,
            BackwardKernel::GradInput
                | BackwardKernel::ChannelGradInput
                | BackwardKernel::ChannelGradInputHeld
        )
    });
    full.work_vec4 = full.work_vec4.max(groups);
    full
}

/// Records the backward of the saved forward. With `preset_sums`, the
/// per-group sums `(Σg, Σg·x̂)` (scaled to this replica's count) are given —
/// SyncBatchNorm's all-reduced sums — and only grad_input is computed.
pub(crate) fn record_backward_with(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    saved: Option<&Saved>,
    affine: &Affine,
    dy: &GpuTensor,
    preset_sums: Option<&[[f32; 4]]>,
) -> Result<(Gradients, Vec<Dispatch>)> {
    let (_, x) = spec_for(saved, affine, dy)?;
    let grads = Gradients::zeros(ctx, x.shape(), x.dtype(), affine)?;
    let dispatches = record_backward_into(ctx, encoder, saved, affine, dy, preset_sums, &grads)?;
    Ok((grads, dispatches))
}

/// Refuses gradients that do not fit the backward of a forward of input
/// `x` with `affine`, or that share a buffer with a tensor the pass binds:
/// every binding of a dispatch that writes must have its buffer to itself.
fn check_gradients(
    ctx: &Context,
    x: &GpuTensor,
    dy: &GpuTensor,
    affine: &Affine,
    grads: &Gradients,
) -> Result<()> {
    let gi = &grads.grad_input;
    if gi.shape() != x.shape() || gi.dtype() != x.dtype() {
        return Err(Error::Shape(format!(
            "expected grad_input of shape {:?} and dtype {} (the forward's input), got shape {:?} and dtype {}",
            x.shape(),
            x.dtype(),
            gi.shape(),
            gi.dtype()
        )));
    }
    for (name, param_name, param, grad) in [
        ("grad_weight", "weight", &affine.weight, &grads.grad_weight),
        ("grad_bias", "bias", &affine.bias, &grads.grad_bias),
    ] {
        match (param, grad) {
            (Some(p), Some(g)) => {
                if g.numel() != p.numel() {
                    return Err(Error::Shape(format!(
                        "expected {name} of {} elements (the parameter's), got shape {:?}",
                        p.numel(),
                        g.shape(),
                    )));
                }
                if g.dtype() != p.dtype() {
                    return Err(Error::Dtype(format!(
                        "expected {name} of dtype {} (the parameter's), got {}",
                        p.dtype(),
                        g.dtype()
                    )));
                }
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::InvalidArgument(format!(
                    "the layer has {param_name}, so {name} is needed"
                )))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "the layer has no {param_name}, so {name} must be None"
                )))
            }
        }
    }
    let written: Vec<(&str, &GpuTensor)> = [
        ("grad_input", Some(gi)),
        ("grad_weight", grads.grad_weight.as_ref()),
        ("grad_bias", grads.grad_bias.as_ref()),
    ]
    .into_iter()
    .filter_map(|(n, t)| t.map(|t| (n, t)))
    .collect();
    for (name, t) in &written {
        ctx.check_owned(name, t)?;
    }
    let read: Vec<&GpuTensor> = [
        Some(x),
        Some(dy),
        affine.weight.as_ref(),
        affine.bias.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (i, (name, t)) in written.iter().enumerate() {
        let clash = read.iter().any(|o| t.same_buffer(o))
            || written
                .iter()
                .enumerate()
                .any(|(j, (_, o))| j != i && t.same_buffer(o));
        if clash {
            return Err(Error::InvalidArgument(format!(
                "{name} must not share a buffer with the input, grad_output, the parameters or another gradient"
            )));
        }
    }
    Ok(())
}

/// Records the backward of the saved forward into `encoder`, writing the
/// caller's `grads` ([`check_gradients`]). With `preset_sums`, as in
/// [`record_backward_with`].
pub(crate) fn record_backward_into(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    saved: Option<&Saved>,
    affine: &Affine,
    dy: &GpuTensor,
    preset_sums: Option<&[[f32; 4]]>,
    grads: &Gradients,
) -> Result<Vec<Dispatch>> {
    let (spec, x) = spec_for(saved, affine, dy)?;
    half_params::check_params(ctx, x.dtype(), affine, None)?;
    let saved = saved.ok_or_else(|| Error::State("no saved forward".into()))?;
    ctx.check_context("the saved forward", saved.context)?;
    ctx.check_owned("grad_output", dy)?;
    affine.check_context(ctx)?;
    check_gradients(ctx, &x, dy, affine, grads)?;
    crate::norm::check_bound_offsets(
        ctx,
        &[
            Some(dy),
            affine.weight.as_ref(),
            Some(&grads.grad_input),
            grads.grad_weight.as_ref(),
            grads.grad_bias.as_ref(),
        ],
    )?;
    let v = &spec.view;
    to_u32("the input's element count", v.numel())?;
    let chunks = chunks_for(ctx, &spec);
    let plan = match preset_sums {
        None if v.numel() == 0 => plan_empty(&spec, grads, saved.spec.empty_batch_nan),
        None => plan_for(&spec, &ctx.caps(), &chunks),
        Some(_) => plan_preset_sums(&spec, v.groups(), &chunks),
    };
    let work_bytes = 16 * plan.work_vec4 as u64;
    to_u32("the backward scratch", plan.work_vec4)?;
    // Bound whole: a split tensor's partials (a γ per column of very long,
    // few rows keeps one per column and chunk) may outgrow a binding.
    ctx.check_whole_binding("the backward scratch", work_bytes)?;
    let work = match preset_sums {
        // The preset sums are written by the queue before the next submit,
        // so they need a buffer no other recorded pass uses.
        Some(_) => ctx.create_buffer("gpunorm backward scratch", work_bytes)?,
        None => ctx.backward.work_buffer(ctx, work_bytes)?,
    };
    let dispatches: Vec<Dispatch> = plan
        .steps
        .iter()
        .map(|s| Dispatch {
            kernel: s.kernel,
            workgroups: s.workgroups as u32,
        })
        .collect();
    if plan.steps.is_empty() {
        return Ok(dispatches);
    }
    let grids = plan
        .steps
        .iter()
        .map(|s| to_u32("the backward grid", s.workgroups).map(kernels::grid))
        .collect::<Result<Vec<_>>>()?;
    // f32 working copies of a half-precision γ (the forward's, reused) and
    // of half-precision parameter gradients (fresh: `self` is not mutable
    // here, and they are two small vectors).
    let reuse = saved.copies.weight.clone();
    let weight = half_params::copy_for(ctx, affine.weight.as_ref(), reuse)?;
    let grad_weight = half_params::copy_for(ctx, grads.grad_weight.as_ref(), None)?;
    let grad_bias = half_params::copy_for(ctx, grads.grad_bias.as_ref(), None)?;
    if let Some(sums) = preset_sums {
        ctx.queue.write_buffer(&work, 0, bytemuck::cast_slice(sums));
    }
    half_params::record_casts(
        ctx,
        encoder,
        Cast::Widen,
        &[(affine.weight.as_ref(), weight.as_ref())],
        &saved.copies.bindings,
    );
    let weight = weight.as_ref().or(affine.weight.as_ref());
    let written = Gradients {
        grad_input: grads.grad_input.clone(),
        grad_weight: grad_weight.clone().or_else(|| grads.grad_weight.clone()),
        grad_bias: grad_bias.clone().or_else(|| grads.grad_bias.clone()),
    };
    record_backward_pass(
        ctx, encoder, &plan, &grids, &chunks, &spec, &x, dy, weight, saved, &written, &work,
    );
    half_params::record_casts(
        ctx,
        encoder,
        Cast::Narrow,
        &[
            (grads.grad_weight.as_ref(), grad_weight.as_ref()),
            (grads.grad_bias.as_ref(), grad_bias.as_ref()),
        ],
        &[],
    );
    Ok(dispatches)
}

/// Records `plan`'s dispatches (on `grids`, one per step) in one compute
/// pass, γ and the parameter gradients in f32.
#[allow(clippy::too_many_arguments)]
fn record_backward_pass(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    plan: &Plan,
    grids: &[(u32, u32)],
    chunks: &Chunks,
    spec: &BackwardSpec,
    x: &GpuTensor,
    dy: &GpuTensor,
    weight: Option<&GpuTensor>,
    saved: &Saved,
    grads: &Gradients,
    work: &wgpu::Buffer,
) {
    if chunks.count > 1
        && !chunks.whole_blocks
        && plan
            .steps
            .iter()
            .any(|s| s.kernel == BackwardKernel::Partials)
    {
        // A split tensor's partials dispatches skip the groups without
        // elements in their chunk: those slots must read zero (the
        // scratch is shared, so they would hold another pass's values).
        let sums = 16 * spec.view.groups() as u64;
        encoder.clear_buffer(work, sums, Some(16 * plan.work_vec4 as u64 - sums));
    }
    let cache = &ctx.backward;
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("gpunorm backward"),
        timestamp_writes: None,
    });
    for (step, &(gx, gy)) in plan.steps.iter().zip(grids) {
        // A chunk of whole blocks reads the statistics of its own groups.
        let stats = if chunks.whole_blocks {
            let first = chunks.first_group(&spec.view, step.chunk) as u64;
            let groups = chunks.block_view(&spec.view, step.chunk).groups() as u64;
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &saved.scratch,
                offset: 16 * first,
                size: wgpu::BufferSize::new(16 * groups.max(1)),
            })
        } else {
            saved.scratch.as_entire_binding()
        };
        let uniform = kernels::uniform_buffer(
            &ctx.device,
            "gpunorm backward",
            bytemuck::bytes_of(&step.params.uniform()),
        );
        let bind_group = cache.set.bind_group(
            &ctx.device,
            "gpunorm backward",
            &uniform,
            [
                chunk_binding(x, chunks, step.chunk),
                chunk_binding(dy, chunks, step.chunk),
                GpuTensor::binding_or(weight, &cache.dummies[0]),
                stats,
                chunk_binding(&grads.grad_input, chunks, step.chunk),
                GpuTensor::binding_or(grads.grad_weight.as_ref(), &cache.dummies[1]),
                GpuTensor::binding_or(grads.grad_bias.as_ref(), &cache.dummies[2]),
                work.as_entire_binding(),
            ],
        );
        pass.set_bind_group(0, &bind_group, &[]);
        pass.set_pipeline(&cache.get(&ctx.device, step.kernel, &step.params, spec.dtype));
        pass.dispatch_workgroups(gx, gy, 1);
    }
}

/// A binding of `t` (x, grad_output or grad_input): whole, or chunk
/// `chunk` of it when the tensor is split.
fn chunk_binding<'a>(t: &'a GpuTensor, chunks: &Chunks, chunk: usize) -> wgpu::BindingResource<'a> {
    if chunks.count > 1 {
        let (lo, hi) = chunks.range(chunk, t.numel());
        t.binding_elements(lo, hi)
    } else {
        t.binding()
    }
}

/// Records and submits the backward of the saved forward; wgpu errors come
/// back as [`Error::Wgpu`].
pub(crate) fn run_backward(
    ctx: &Context,
    saved: Option<&Saved>,
    affine: &Affine,
    dy: &GpuTensor,
) -> Result<Gradients> {
    spec_for(saved, affine, dy)?;
    submit_scoped(ctx, |encoder| {
        record_backward(ctx, encoder, saved, affine, dy).map(|(g, _)| g)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(view: View, source: StatsSource, affine: bool) -> BackwardSpec {
        BackwardSpec {
            view,
            dtype: DType::F32,
            rms: false,
            source,
            weight: affine,
            grad_weight: affine,
            grad_bias: affine,
        }
    }

    fn kernels_of(s: &BackwardSpec) -> Vec<BackwardKernel> {
        plan_backward(s).iter().map(|d| d.kernel).collect()
    }

    #[test]
    fn a_split_tensor_runs_partials_and_grad_input_per_chunk_and_one_finalize() {
        use BackwardKernel::*;
        let chunked = |s: &BackwardSpec, chunks: &Chunks| {
            let plan = plan_for(s, &Caps::baseline(), chunks);
            let steps: Vec<(BackwardKernel, usize)> =
                plan.steps.iter().map(|s| (s.kernel, s.chunk)).collect();
            for step in &plan.steps {
                assert!(step.params.flags & BF_CHUNKED != 0, "{step:?}");
                let (lo, hi) = chunks.range(step.chunk, s.view.numel());
                if step.kernel != Finalize {
                    assert_eq!(
                        (step.params.chunk_base, step.params.chunk_len),
                        (lo as u32, (hi - lo) as u32)
                    );
                }
            }
            (steps, plan.work_vec4)
        };
        // BatchNorm 16x64x250x300 f32 on 128 MiB bindings: three chunks;
        // the channel's tiles of every chunk merged by one finalize.
        let bn = View::batch_norm(&[16, 64, 250, 300], 1);
        let chunks = Chunks::new(bn.numel(), DType::F32, 128 << 20);
        assert_eq!(chunks.count, 3);
        let (steps, work) = chunked(&spec(bn, StatsSource::Batch, true), &chunks);
        let per_chunk = |k| (0..3).map(move |c| (k, c));
        let want: Vec<_> = per_chunk(Partials)
            .chain([(Finalize, 0)])
            .chain(per_chunk(GradInput))
            .collect();
        assert_eq!(steps, want);
        let tiles = tiles_for(bn.group_len());
        assert_eq!(work, 64 + 64 * tiles * 3);
        // Eval without affine gradients: grad_input alone.
        let (steps, _) = chunked(&spec(bn, StatsSource::Running, false), &chunks);
        assert_eq!(steps, per_chunk(GradInput).collect::<Vec<_>>());
        // LayerNorm: the group sums, grad_input, then the column sums of
        // the [1, R, K, 1] view, each pass per chunk.
        let ln = View::layer_norm(&[40_000, 1000], 1000);
        let chunks = Chunks::new(ln.numel(), DType::F32, 128 << 20);
        assert_eq!(chunks.count, 2);
        let (steps, _) = chunked(&spec(ln, StatsSource::Batch, true), &chunks);
        let per_chunk = |k| (0..2).map(move |c| (k, c));
        let want: Vec<_> = per_chunk(Partials)
            .chain([(Finalize, 0)])
            .chain(per_chunk(GradInput))
            .chain(per_chunk(Partials))
            .chain([(Finalize, 0)])
            .collect();
        assert_eq!(steps, want);
        // A tensor in one binding keeps its plan.
        let whole = Chunks::whole(ln.numel());
        let s = spec(ln, StatsSource::Batch, true);
        let plan = plan_for(&s, &Caps::baseline(), &whole);
        assert!(plan.steps.iter().all(|s| s.params.flags & BF_CHUNKED == 0));
        assert_eq!(
            plan.steps.len(),
            plan_with(&s, &Caps::baseline(), false).steps.len()
        );
    }

    #[test]
    fn layer_norm_backward_is_one_row_dispatch_plus_column_sums() {
        use BackwardKernel::*;
        let v = View::layer_norm(&[4096, 1024], 1024);
        assert_eq!(
            kernels_of(&spec(v, StatsSource::Batch, true)),
            [Rows, Cols, Finalize]
        );
        assert_eq!(kernels_of(&spec(v, StatsSource::Batch, false)), [Rows]);
        let few = View::layer_norm(&[8, 1024], 1024);
        assert_eq!(
            kernels_of(&spec(few, StatsSource::Batch, true)),
            [Rows, Cols]
        );
    }

    #[test]
    fn per_invocation_loops_stay_under_lavapipes_limit() {
        // lavapipe silently stops an invocation's loops after 65,535
        // iterations: the column sums walk their steps, the column kernel
        // its block's rows, the row kernels a row's vectors.
        let lavapipe = Caps {
            subgroups: true,
            subgroup_max: 8,
            subgroup_min: 8,
            cpu: true,
        };
        let rows4 = View::layer_norm(&[4_000_000, 4], 4);
        assert!(fused_column_sums(&rows4, &lavapipe, true, 30_000));
        assert!(!fused_column_sums(&rows4, &lavapipe, true, 62_500));
        for rows in [100, 4_000_000, 17_000_000, 40_000_000] {
            let blocks = col_blocks(rows);
            assert!(rows.div_ceil(blocks) <= COLS_MAX_BLOCK_ROWS, "{rows}");
            assert!(blocks <= COLS_MAX_BLOCKS || rows > COLS_MAX_BLOCKS * COLS_MAX_BLOCK_ROWS);
        }
        let long = View::layer_norm(&[64, 1 << 20], 1 << 20);
        assert!(!uses_rows(&long, DType::F16));
        assert!(uses_rows(
            &View::layer_norm(&[64, 1 << 19], 1 << 19),
            DType::F16
        ));
    }

    #[test]
    fn rows_of_whole_vectors_take_the_subgroup_row_kernel_where_subgroups_exist() {
        use BackwardKernel::*;
        let caps = Caps {
            subgroups: true,
            subgroup_max: 32,
            subgroup_min: 32,
            cpu: false,
        };
        let on = |s: &BackwardSpec| -> Vec<(BackwardKernel, u32)> {
            plan_backward_on(s, &caps)
                .iter()
                .map(|d| (d.kernel, d.workgroups))
                .collect()
        };
        // 4096 rows too long for a subgroup to hold: a workgroup per row
        // holds them; columns eight per invocation; 128 row blocks per
        // column, merged serially, one invocation per column.
        let v = View::layer_norm(&[4096, 2048], 2048);
        assert_eq!(
            on(&spec(v, StatsSource::Batch, true)),
            [
                (RowsWorkgroupHeld, 4096),
                (Cols, 128 * 4),
                (Finalize, 2048 / 64)
            ]
        );
        // Rows too long for a workgroup too: four per step of a 32-wide
        // subgroup, two subgroups per 64-invocation workgroup.
        let longest = View::layer_norm(&[4096, 16400], 16400);
        assert_eq!(
            on(&spec(longest, StatsSource::Batch, true))[0],
            (RowsSubgroup, 512)
        );
        // Fewer rows than a GPU wants in steps of four: one per step.
        let half = View::layer_norm(&[2048, 16400], 16400);
        assert_eq!(
            on(&spec(half, StatsSource::Batch, true))[0],
            (RowsSubgroup, 1024)
        );
        // A CPU: the row kernel also sums columns per step of four rows, and
        // one pass with an invocation per four columns finishes dγ and dβ.
        let cpu = Caps {
            cpu: true,
            subgroup_min: 8,
            subgroup_max: 8,
            ..caps
        };
        let long = View::layer_norm(&[4096, 4096], 4096);
        let plan = plan_backward_on(&spec(long, StatsSource::Batch, true), &cpu);
        let steps: Vec<_> = plan.iter().map(|d| (d.kernel, d.workgroups)).collect();
        assert_eq!(steps, [(RowsSubgroup, 128), (ColumnSums, 1024 / 64)]);
        // Without parameter gradients there is nothing to sum.
        assert_eq!(
            kernels_of_on(&spec(long, StatsSource::Batch, false), &cpu),
            [RowsSubgroup]
        );
        // Odd rows: the workgroup kernel and one column per invocation.
        let odd = View::layer_norm(&[4096, 1023], 1023);
        assert_eq!(
            on(&spec(odd, StatsSource::Batch, true)),
            [
                (Rows, 4096),
                (Cols, 128 * 16),
                (Finalize, 1023usize.div_ceil(64) as u32)
            ]
        );
        // InstanceNorm 8x64x128x128: a workgroup per group of 16384, as
        // the forward held it; per-channel partials, merged over samples.
        let inorm = View::instance_norm(&[8, 64, 128, 128]);
        assert_eq!(
            on(&spec(inorm, StatsSource::Batch, true)),
            [(RowsWorkgroupHeld, 512), (Finalize, 1)]
        );
        // Groups too long to hold: 512 would be 512 subgroups, too few for
        // a GPU, so tiles spread them over workgroups (5 tiles of 4096 per
        // group of 16640; grad_input in 17 blocks of 256 vectors); the
        // group sums and the per-channel gradients (over 8 samples) are
        // finalized apart; 1024 groups, or a CPU, keep the row kernel.
        let long = View::instance_norm(&[8, 64, 128, 130]);
        assert_eq!(
            on(&spec(long, StatsSource::Batch, true)),
            [
                (PartialsEach, 512 * 5),
                (Finalize, 512),
                (Finalize, 64),
                (GradInput, 512 * 17)
            ]
        );
        let more = View::instance_norm(&[16, 64, 128, 130]);
        assert_eq!(
            kernels_of_on(&spec(more, StatsSource::Batch, true), &caps),
            [RowsSubgroup, Finalize]
        );
        assert_eq!(
            kernels_of_on(&spec(long, StatsSource::Batch, true), &cpu),
            [RowsSubgroup, Finalize]
        );
        // Channels-first GroupNorm: a workgroup per group of 8 channels,
        // one sum per channel; with more than 16 channels per group, the
        // row kernel (tiles would read x and dy a third time for dγ, dβ).
        let gn = View::group_norm(&[8, 256, 32, 32], 32);
        assert_eq!(
            kernels_of_on(&spec(gn, StatsSource::Batch, true), &caps),
            [RowsWorkgroupHeld, Finalize]
        );
        let wide = View::group_norm(&[8, 256, 4, 4], 8);
        assert_eq!(
            kernels_of_on(&spec(wide, StatsSource::Batch, true), &caps),
            [RowsSubgroup, Finalize]
        );
    }

    #[test]
    fn held_rows_read_x_and_dy_once_and_sum_columns_per_block_on_a_cpu() {
        use BackwardKernel::*;
        let gpu = Caps {
            subgroups: true,
            subgroup_max: 32,
            subgroup_min: 32,
            cpu: false,
        };
        let steps = |s: &BackwardSpec, caps: &Caps| -> Vec<(BackwardKernel, u32)> {
            plan_backward_on(s, caps)
                .iter()
                .map(|d| (d.kernel, d.workgroups))
                .collect()
        };
        // A GPU: a row per 32-wide subgroup, two per workgroup; dγ and dβ
        // from the column kernel.
        let v = View::layer_norm(&[4096, 1024], 1024);
        assert_eq!(
            steps(&spec(v, StatsSource::Batch, true), &gpu),
            [(RowsHeld, 2048), (Cols, 128 * 2), (Finalize, 1024 / 64)]
        );
        // lavapipe: 256 blocks of 64 rows, eight subgroups per workgroup,
        // and the blocks' column sums added up per four columns.
        let lavapipe = Caps {
            subgroup_max: 8,
            subgroup_min: 8,
            cpu: true,
            ..gpu
        };
        let short = View::layer_norm(&[16384, 256], 256);
        assert_eq!(
            steps(&spec(short, StatsSource::Batch, true), &lavapipe),
            [(RowsHeld, 256 / 8), (ColumnSums, 1)]
        );
        assert_eq!(
            steps(&spec(short, StatsSource::Batch, false), &lavapipe),
            [(RowsHeld, 256 / 8)]
        );
        // InstanceNorm rows each have their channel's γ: not held.
        let inorm = View::instance_norm(&[8, 64, 16, 16]);
        assert_eq!(
            kernels_of_on(&spec(inorm, StatsSource::Batch, true), &lavapipe)[0],
            RowsSubgroup
        );
        // Half storage of rows of whole pairs of vectors: paired slots, an
        // even count (36 vectors: 5 per lane singly, 3 pairs).
        let held = |len: usize, dtype| {
            let s = BackwardSpec {
                dtype,
                ..spec(View::layer_norm(&[64, len], len), StatsSource::Batch, true)
            };
            let step = plan_with(&s, &lavapipe, false).steps[0];
            assert_eq!(step.kernel, RowsHeld);
            let flags = step.params.flags;
            (flags >> BF_HELD_SHIFT, flags & BF_PAIRS != 0)
        };
        assert_eq!(held(256, DType::F16), (8, true));
        assert_eq!(held(144, DType::BF16), (6, true));
        assert_eq!(held(144, DType::F32), (5, false));
        assert_eq!(held(260, DType::F16), (9, false));
        // Rows too long to hold go to the subgroup row kernel, in pairs
        // where they and their channels are whole pairs of half vectors,
        // one row per step (not 64 LayerNorm rows, four per step).
        let long = |view: View, dtype| {
            let s = BackwardSpec {
                dtype,
                ..spec(view, StatsSource::Batch, true)
            };
            let step = plan_with(&s, &lavapipe, false).steps[0];
            assert_eq!(step.kernel, RowsSubgroup);
            step.params.flags & BF_PAIRS != 0
        };
        assert!(long(View::layer_norm(&[8, 1040], 1040), DType::BF16));
        assert!(!long(View::layer_norm(&[64, 1040], 1040), DType::BF16));
        assert!(!long(View::layer_norm(&[8, 1036], 1036), DType::F16));
        assert!(!long(View::layer_norm(&[8, 1040], 1040), DType::F32));
        // GroupNorm channels of 16 in pairs, of 12 (in groups of 48) singly.
        assert!(long(View::group_norm(&[2, 8, 4, 4], 2), DType::F16));
        assert!(!long(View::group_norm(&[2, 8, 3, 4], 2), DType::F16));
    }

    #[test]
    fn runs_of_one_gamma_go_by_subgroup_on_a_cpu() {
        use BackwardKernel::*;
        let lavapipe = Caps {
            subgroups: true,
            subgroup_max: 8,
            subgroup_min: 8,
            cpu: true,
        };
        // 2048 runs of 56², in blocks of 32 on 64 subgroups of 8: a partial
        // per run (32 per channel), then grad_input run by run.
        let v = View::batch_norm(&[32, 64, 56, 56], 1);
        let plan: Vec<_> = plan_backward_on(&spec(v, StatsSource::Batch, true), &lavapipe)
            .iter()
            .map(|d| (d.kernel, d.workgroups))
            .collect();
        assert_eq!(
            plan,
            [
                (PartialsRuns, 64 / 8),
                (Finalize, 1),
                (GradInputRuns, 64 / 8)
            ]
        );
        // Eval mode without parameter gradients: grad_input only.
        assert_eq!(
            kernels_of_on(&spec(v, StatsSource::Running, false), &lavapipe),
            [GradInputRuns]
        );
        // Half runs of whole pairs of vectors move them in one access each;
        // the finalize binds no x, and f32 runs have no pairs.
        let paired = |dtype, shape: &[usize]| {
            let s = BackwardSpec {
                dtype,
                ..spec(View::batch_norm(shape, 1), StatsSource::Batch, true)
            };
            plan_with(&s, &lavapipe, false)
                .steps
                .iter()
                .map(|step| (step.kernel, step.params.flags & BF_PAIRS != 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            paired(DType::F16, &[32, 64, 56, 56]),
            [
                (PartialsRuns, true),
                (Finalize, false),
                (GradInputRuns, true)
            ]
        );
        for (dtype, shape) in [
            (DType::BF16, &[8, 4, 12, 11]),
            (DType::F32, &[8, 4, 16, 16]),
        ] {
            assert!(paired(dtype, shape).iter().all(|&(_, pairs)| !pairs));
        }
        // Runs too short for a subgroup's lanes, or on a GPU: the tiles.
        let small = View::batch_norm(&[32, 64, 7, 7], 1);
        assert_eq!(
            kernels_of_on(&spec(small, StatsSource::Batch, true), &lavapipe)[0],
            Partials
        );
        let gpu = Caps {
            cpu: false,
            ..lavapipe
        };
        assert_eq!(
            kernels_of_on(&spec(v, StatsSource::Batch, true), &gpu)[0],
            PartialsEach
        );
    }

    fn kernels_of_on(s: &BackwardSpec, caps: &Caps) -> Vec<BackwardKernel> {
        plan_backward_on(s, caps).iter().map(|d| d.kernel).collect()
    }

    #[test]
    fn batch_norm_backward_gets_affine_gradients_from_the_group_sums() {
        use BackwardKernel::*;
        let v = View::batch_norm(&[32, 64, 56, 56], 1);
        assert_eq!(
            kernels_of(&spec(v, StatsSource::Batch, true)),
            [PartialsEach, Finalize, GradInput]
        );
        assert_eq!(
            kernels_of(&spec(v, StatsSource::Running, true)),
            [PartialsEach, Finalize, GradInput]
        );
        // Channels shorter than a tile keep one partial per tile.
        let small = View::batch_norm(&[2, 64, 32, 32], 1);
        assert_eq!(
            kernels_of(&spec(small, StatsSource::Batch, true)),
            [Partials, Finalize, GradInput]
        );
        assert_eq!(
            kernels_of(&spec(v, StatsSource::Running, false)),
            [GradInput]
        );
    }

    #[test]
    fn channels_last_batch_norm_backward_takes_the_channel_strip_kernels() {
        use BackwardKernel::*;
        let v = View::batch_norm(&[32, 56, 56, 64], 3);
        let plan = plan_backward(&spec(v, StatsSource::Batch, true));
        // 8 strips of 8 channels; 2048 row blocks of 49 rows; rows of 16 for
        // grad_input.
        assert_eq!(
            plan.iter()
                .map(|d| (d.kernel, d.workgroups))
                .collect::<Vec<_>>(),
            [
                (ChannelCols, 2048 * 8 / 64),
                (Finalize, 64),
                (ChannelGradInput, (100_352 / 16) * 8 / 64)
            ]
        );
        // A CPU: 256 row blocks of 392 rows (2048 invocations) for the
        // sums, blocks of 64 rows for grad_input; the finalize merges
        // serially.
        let cpu = Caps {
            subgroups: true,
            subgroup_max: 8,
            subgroup_min: 8,
            cpu: true,
        };
        let on_cpu = |v: View, caps: &Caps| -> Vec<(BackwardKernel, usize)> {
            plan_with(&spec(v, StatsSource::Batch, true), caps, false)
                .steps
                .iter()
                .map(|s| (s.kernel, s.workgroups))
                .collect()
        };
        assert_eq!(
            on_cpu(v, &cpu),
            [
                (ChannelCols, 256 * 8 / 64),
                (Finalize, 1),
                (ChannelGradInput, (100_352 / 64) * 8 / 64)
            ]
        );
        // Rows of 5 to 8 vectors per lane (132 to 256 channels) go a
        // subgroup per row block, 8 subgroups per workgroup, each lane
        // holding its channels: the sums over 64 blocks (2048 invocations'
        // worth of 32 strips), grad_input over 98 blocks of 64 rows.
        let held_k = |v: View, caps: &Caps| {
            let plan = plan_with(&spec(v, StatsSource::Batch, true), caps, false);
            plan.steps.last().map(|s| s.params.flags >> BF_HELD_SHIFT)
        };
        let c256 = View::batch_norm(&[32, 14, 14, 256], 3);
        assert_eq!(
            on_cpu(c256, &cpu),
            [
                (ChannelColsHeld, 64 / 8),
                (Finalize, 4),
                (ChannelGradInputHeld, 98_usize.div_ceil(8))
            ]
        );
        assert_eq!(held_k(c256, &cpu), Some(8));
        let kernels = |v: View, caps: &Caps| -> Vec<BackwardKernel> {
            on_cpu(v, caps).iter().map(|s| s.0).collect()
        };
        let strips = [ChannelCols, Finalize, ChannelGradInput];
        let held = [ChannelColsHeld, Finalize, ChannelGradInputHeld];
        for (channels, want) in [(128, strips), (132, held), (256, held), (260, strips)] {
            let v = View::batch_norm(&[64, channels], 1);
            assert_eq!(kernels(v, &cpu), want, "{channels} channels");
        }
        assert_eq!(held_k(View::batch_norm(&[64, 132], 1), &cpu), Some(5));
        // Not without subgroups, nor on a GPU.
        let no_subgroups = Caps {
            subgroups: false,
            ..cpu
        };
        assert_eq!(kernels(c256, &no_subgroups), strips);
        assert_eq!(kernels(c256, &Caps::baseline()), strips);
        assert_eq!(
            kernels_of(&spec(v, StatsSource::Running, false)),
            [ChannelGradInput]
        );
        // (N, C) BatchNorm1d is channels-last too; 6 channels are not whole
        // vectors.
        let bn1d = View::batch_norm(&[300, 16], 1);
        assert_eq!(
            kernels_of(&spec(bn1d, StatsSource::Batch, true)),
            [ChannelCols, Finalize, ChannelGradInput]
        );
        // Keras's GroupNormalization: per-group and per-channel merges.
        let gn = View::group_norm_channels_last(&[32, 56, 56, 64], 32);
        assert_eq!(
            kernels_of(&spec(gn, StatsSource::Batch, true)),
            [ChannelCols, Finalize, Finalize, ChannelGradInput]
        );
        let odd = View::batch_norm(&[4, 10, 10, 6], 3);
        assert_eq!(
            kernels_of(&spec(odd, StatsSource::Batch, true)),
            [Partials, Finalize, GradInput]
        );
    }

    #[test]
    fn group_norm_affine_gradients_come_from_the_rows_for_channels_of_whole_vectors() {
        use BackwardKernel::*;
        // 8 channels of 32x32 per group: per-channel partials from the row
        // kernel, summed over samples for each of the 256 channels.
        let v = View::group_norm(&[8, 256, 32, 32], 32);
        assert_eq!(
            plan_backward(&spec(v, StatsSource::Batch, true))
                .iter()
                .map(|d| (d.kernel, d.workgroups))
                .collect::<Vec<_>>(),
            [(Rows, 8 * 32), (Finalize, 256 / 64)]
        );
        // Channels of 9x9: not whole vectors, so an affine view is reduced.
        let odd = View::group_norm(&[8, 256, 9, 9], 32);
        assert_eq!(
            kernels_of(&spec(odd, StatsSource::Batch, true)),
            [Rows, Partials, Finalize]
        );
        let inorm = View::instance_norm(&[8, 64, 128, 128]);
        assert_eq!(
            kernels_of(&spec(inorm, StatsSource::Batch, true)),
            [Rows, Finalize]
        );
    }

    #[test]
    fn packed_halves_take_the_row_kernel_only_for_even_groups() {
        use BackwardKernel::*;
        for dtype in [DType::F16, DType::BF16] {
            let even = View::layer_norm(&[7, 64], 64);
            let odd = View::layer_norm(&[7, 33], 33);
            let mut s = spec(even, StatsSource::Batch, true);
            s.dtype = dtype;
            assert_eq!(kernels_of(&s), [Rows, Cols]);
            s.view = odd;
            assert_eq!(kernels_of(&s), [Partials, Finalize, GradInput, Cols]);
            // f32 words are single elements: odd rows keep the row kernel.
            s.dtype = DType::F32;
            assert_eq!(kernels_of(&s), [Rows, Cols]);
        }
    }

    #[test]
    fn column_scratch_stays_a_fraction_of_the_input() {
        for (rows, cols) in [(1usize, 1usize << 24), (33, 100_000), (1 << 20, 64)] {
            let v = View::layer_norm(&[rows, cols], cols);
            let p = plan_with(&spec(v, StatsSource::Batch, true), &Caps::baseline(), false);
            assert!(
                p.work_vec4 * 16 <= 2 * rows * 16 + (rows * cols * 4).div_ceil(2),
                "{rows}x{cols}: {} vec4",
                p.work_vec4
            );
        }
    }
}
