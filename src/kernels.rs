//! Shader sources, pipeline creation and caching, dispatch geometry.
//!
//! Every forward kernel is assembled from plain WGSL files in `shaders/`: a
//! prelude of the constants below, the load/store file of the storage dtype,
//! `common.wgsl` (parameters, bindings, helpers) and the kernel's own file.
//! Pipelines are built once per (kernel, dtype, [`Variant`] of override
//! constants) and cached in the context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::tensor::DType;

/// Invocations per workgroup of the partials pass. With
/// [`STATS_PER_THREAD`] values summed per invocation, one tile is 4096
/// elements: large enough that the finalize pass merges few partials, small
/// enough that a BatchNorm channel of a few thousand elements still spreads
/// over several workgroups. 64 rather than 256 invocations: the
/// workgroup-memory merge then takes 6 barriers instead of 8 over 4x fewer
/// invocations, and lavapipe pays per invocation at each barrier (BatchNorm
/// train 0.17 -> 0.23 of the copy kernel); 64 is still a whole wave on
/// every GPU.
pub const STATS_WG: u32 = 64;
/// Values each partials invocation sums (16 vec4 when B is a multiple of 4).
pub const STATS_PER_THREAD: u32 = 64;
/// Elements of one tile of the partials pass.
pub const STATS_TILE: u32 = STATS_WG * STATS_PER_THREAD;
/// Rows each invocation of the column partials kernel sums (its partials
/// take 1/COLUMN_ROWS of the input's size in scratch; `tile_len` of the
/// dispatch). 64 rather than 16: merging 6272 partials per channel took
/// lavapipe's finalize 2-3 ms of channels-last BatchNorm 32x56x56x64, 1568
/// take 1 ms. A CPU adapter takes 256 ([`COLUMN_ROWS_CPU`]): each
/// invocation first finds its columns' shifts, and 392 partials per channel
/// merge in 0.6 ms (partials 5.1 -> 4.0 ms, finalize 1.1 -> 0.6 ms); a GPU
/// keeps more invocations in flight.
pub const COLUMN_ROWS: u32 = 64;
pub const COLUMN_ROWS_CPU: u32 = 256;
/// Leading rows of a column partials block whose mean centres the block's
/// sums (`COLUMN_PREFIX` in WGSL). Centred on the group's shift alone, a
/// column whose shift lay 3σ from its mean lost a digit of its variance to
/// Σd² − (Σd)²/n (y off by 2e-5 with γ, β); four rows put the centre
/// within σ/2 of the mean on average, at four extra loads per block.
pub const COLUMN_PREFIX: u32 = 4;
/// Invocations per workgroup of the finalize and eval-statistics passes.
pub const FINALIZE_WG: u32 = 64;
/// Invocations per workgroup of the normalize pass.
pub const NORMALIZE_WG: u32 = 256;
/// Aligned groups of four elements each normalize invocation writes, a
/// workgroup apart (more work per invocation was measurably faster on
/// lavapipe, see NOTES.md).
pub const NORMALIZE_VEC4: u32 = 8;
/// Invocations per workgroup of the run-by-run normalize kernel, and the
/// most vec4 each one writes per run.
pub const RUNS_WG: u32 = 64;
pub const RUNS_VEC4_MAX: u32 = 16;
/// Rows each `normalize_columns` invocation writes on a CPU adapter
/// ([`crate::engine::RunGrid::columns`]; NORMALIZE_VEC4 on a GPU).
pub const COLUMN_STEPS_CPU: u32 = 128;
/// Shortest run (B) the run-by-run normalize kernel takes. Runs of 128
/// elements leave three quarters of its workgroup idle, and still beat the
/// flat normalize kernel, which divides and gathers statistics and
/// parameters per vector (lavapipe, BatchNorm 32x256x14x14 eval: 18 ->
/// 5.5 ms; 256x64x256 eval: 32 -> 12 ms).
pub const RUNS_MIN_LEN: u32 = 128;
/// Runs shorter than this (with several rows per p) may go by fixed
/// columns instead (`normalize_columns`, when a row's vectors divide its
/// workgroup).
pub const COLUMNS_MAX_RUN: u32 = 512;
/// Elements each normalize invocation writes.
pub const NORMALIZE_PER_THREAD: u32 = 4 * NORMALIZE_VEC4;
/// Invocations per workgroup of the row kernel.
pub const ROWS_WG: u32 = 128;
/// Element pairs each row-kernel invocation keeps in registers: rows up to
/// 2·8·128 = 2048 elements are read from memory once.
pub const ROWS_CACHE: u32 = 8;
/// Invocations per workgroup of the subgroup row kernel (a multiple of every
/// subgroup size: 8 on lavapipe gives 8 rows per workgroup, 32 gives 2).
pub const ROWS_SG_WG: u32 = 64;
/// Rows the subgroup row kernel walks at a time when all rows share their
/// affine parameters (`ROWS_SG_R` in rows_subgroup.wgsl).
pub const ROWS_SG_STEP: u32 = 4;
/// Fewest steps of [`ROWS_SG_STEP`] rows that keep an adapter busy: a few
/// subgroups fill a CPU, a GPU wants thousands in flight.
pub const ROWS_SG_MIN_STEPS_CPU: usize = 16;
pub const ROWS_SG_MIN_STEPS_GPU: usize = 1024;
/// Vectors of a row one lane of the held-row kernel can keep (the four
/// octets of slots in rows_held.wgsl): rows up to 4·32·width elements. A
/// CPU spills the surplus to its stack cheaply (rows of 1024 on lavapipe:
/// about 0.75 of the copy, against 0.55 reading x twice).
pub const HELD_SLOTS: u32 = 32;
/// Slots the held-row kernel uses on a GPU: x, γ and β of 8 vectors are 96
/// registers per lane; more would cost occupancy or spill to memory.
pub const HELD_SLOTS_GPU: u32 = 8;
/// Invocations per workgroup of the workgroup-held row kernel
/// (rows_workgroup_held.wgsl, GPUs): WebGPU's default limit.
pub const ROWS_WG_HELD: u32 = 256;
/// Vectors of a row each invocation of the workgroup-held row kernel can
/// keep: rows up to 4·16·256 = 16384 elements ([`ROWS_MAX_LEN`]). x alone
/// is then 64 registers per invocation.
pub const HELD_SLOTS_WORKGROUP: u32 = 16;
/// Subgroups the block-walking kernels (held rows, runs on subgroups)
/// spread their rows or runs over on a CPU: several per core of a large
/// CPU, each walking a block of contiguous ones (at most
/// [`BLOCK_ROWS_MAX_CPU`]), so the thread running it streams through
/// memory and loads γ/β of held rows once per block, and the held backward
/// writes its column sums once per block. 64 rather than 512: blocks of 64
/// rows instead of 8 for 4096 rows of 1024 took the LayerNorm forward 5.2
/// -> 4.45 ms and its backward 11.1 -> 8.4 ms on lavapipe (γ/β and the
/// column sums are 32 vectors per lane there); other shapes unchanged.
/// A GPU gets a subgroup per row: it wants every subgroup it can have in
/// flight, and caches γ/β.
pub const BLOCK_SUBGROUPS_CPU: usize = 64;
pub const BLOCK_ROWS_MAX_CPU: usize = 64;
/// Longest row the single-dispatch row kernel takes when there are few rows;
/// longer rows with fewer than [`ROWS_MIN_FOR_LONG`] rows go through the
/// partials/finalize/normalize path, which spreads a row over many
/// workgroups.
pub const ROWS_MAX_LEN: u32 = 16384;
/// Rows above which the row kernel is used whatever their length (up to
/// [`ROWS_LONG_MAX`]): there is then enough parallelism across rows.
pub const ROWS_MIN_FOR_LONG: u32 = 64;
/// Longest row the row kernels take at all. A lane of a subgroup of 8
/// walks a row's vectors twice, and lavapipe stops an invocation's loops
/// after 65,535 iterations in all, silently: rows of 2^20 halves (64 of
/// them fill 128 MiB) lost their last elements. Longer rows take the
/// partials/finalize/normalize path, which spreads a row over workgroups.
pub const ROWS_LONG_MAX: u32 = 1 << 19;
/// Most loop iterations one invocation may run on lavapipe, which silently
/// stops its loops after them (65,535 in all, entries included); plans
/// keep per-invocation loops well under it.
pub const LAVAPIPE_LOOP_LIMIT: usize = 65_535;
/// Most partials one finalize output merges in one invocation
/// ([`Kernel::FinalizeSerial`]); with more, a workgroup per output merges
/// them as a tree. lavapipe paid about 10 µs of barriers per workgroup of
/// the tree, which dominated views with many small groups.
pub const FINALIZE_SERIAL_MAX: u32 = 256;
/// [`FINALIZE_SERIAL_MAX`] on a CPU adapter, where a lane merging a
/// thousand partials costs less than a workgroup's barriers, forward and
/// backward. On lavapipe, medians of alternating runs: the BatchNorm
/// forward of 32x56x56x64 channels-last (392 partials for each of 64
/// channels) went from 10.56 to 10.25 ms (6 runs), the backward of
/// 8x64x64x32 channels-last (512 for each of 32) from 2.64 to 2.53 ms (9).
pub const FINALIZE_SERIAL_MAX_CPU: u32 = 1024;
/// Largest workgroup count per grid dimension that WebGPU guarantees.
pub const MAX_GRID_DIM: u32 = 65535;

/// One compute entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Per-tile (count, mean, M2) partials.
    Partials,
    /// Per-invocation (count, mean, M2) partials: `Partials` without the
    /// workgroup merge (tensors in one binding).
    PartialsEach,
    /// Per-column partials for views with short runs (channels-last).
    PartialsColumns,
    /// Increments num_batches_tracked (empty inputs only).
    BumpCounter,
    /// Sets the running statistics to NaN (empty inputs only: training on
    /// no values, as torch's tracked InstanceNorm and Keras's
    /// BatchNormalization do).
    RunningNan,
    /// Copies each group's first element, the shift of its statistics, into
    /// the scratch (chunked tensors only: the partials of later chunks
    /// cannot read it from their own binding).
    Shifts,
    /// Chan merge of partials to statistics, running-stat update.
    Finalize,
    /// Finalize with one invocation per output, for outputs with few
    /// partials ([`FINALIZE_SERIAL_MAX`]): no barrier.
    FinalizeSerial,
    /// Finalize of running channels with many groups each (a tracked
    /// InstanceNorm's instances): a workgroup per channel, an invocation
    /// per group, one tree over the channel's running update.
    FinalizeGroups,
    /// Statistics from running mean/var (eval mode).
    EvalStats,
    /// Fused normalize-scale-shift.
    Normalize,
    /// Fused normalize-scale-shift, workgroups along runs of B elements.
    NormalizeRuns,
    /// Fused normalize-scale-shift for short runs, fixed columns per lane.
    NormalizeColumns,
    /// Whole-row kernel for contiguous groups.
    Rows,
    /// Row kernel with one subgroup per row (adapters with subgroups).
    RowsSubgroup,
    /// Row kernel with one subgroup per row held in registers: x read once
    /// (short rows sharing their affine parameters).
    RowsHeld,
    /// Row kernel with one workgroup per row held in registers: x read once
    /// (rows too long for a subgroup's slots, GPUs).
    RowsWorkgroupHeld,
    /// A partial per run of B, one subgroup per run (CPU adapters with
    /// subgroups).
    PartialsRuns,
    /// Fused normalize-scale-shift, one subgroup per run of B (CPU adapters
    /// with subgroups).
    NormalizeRunsSubgroup,
    /// [`Kernel::PartialsColumns`] with a subgroup per row, each lane
    /// holding its columns (CPU adapters with subgroups,
    /// [`crate::engine::held_columns`]).
    PartialsColumnsHeld,
    /// [`Kernel::NormalizeColumns`] with a subgroup per row, each lane
    /// holding its columns' scale and offset.
    NormalizeColumnsHeld,
}

impl Kernel {
    /// Every kernel, for validation tests.
    pub const ALL: [Kernel; 21] = [
        Kernel::RowsWorkgroupHeld,
        Kernel::PartialsColumnsHeld,
        Kernel::NormalizeColumnsHeld,
        Kernel::PartialsRuns,
        Kernel::NormalizeRunsSubgroup,
        Kernel::RowsHeld,
        Kernel::NormalizeColumns,
        Kernel::PartialsColumns,
        Kernel::NormalizeRuns,
        Kernel::RowsSubgroup,
        Kernel::Partials,
        Kernel::PartialsEach,
        Kernel::BumpCounter,
        Kernel::RunningNan,
        Kernel::Shifts,
        Kernel::Finalize,
        Kernel::FinalizeSerial,
        Kernel::FinalizeGroups,
        Kernel::EvalStats,
        Kernel::Normalize,
        Kernel::Rows,
    ];

    fn file(self) -> &'static str {
        match self {
            Kernel::Partials
            | Kernel::PartialsEach
            | Kernel::PartialsColumns
            | Kernel::BumpCounter
            | Kernel::RunningNan
            | Kernel::Shifts => {
                include_str!("../shaders/stats.wgsl")
            }
            Kernel::Finalize
            | Kernel::FinalizeSerial
            | Kernel::FinalizeGroups
            | Kernel::EvalStats => {
                include_str!("../shaders/finalize.wgsl")
            }
            Kernel::Normalize | Kernel::NormalizeRuns | Kernel::NormalizeColumns => {
                include_str!("../shaders/normalize.wgsl")
            }
            Kernel::Rows => include_str!("../shaders/rows.wgsl"),
            Kernel::RowsSubgroup => include_str!("../shaders/rows_subgroup.wgsl"),
            Kernel::RowsHeld => include_str!("../shaders/rows_held.wgsl"),
            Kernel::RowsWorkgroupHeld => include_str!("../shaders/rows_workgroup_held.wgsl"),
            Kernel::PartialsRuns | Kernel::NormalizeRunsSubgroup => {
                include_str!("../shaders/runs_subgroup.wgsl")
            }
            Kernel::PartialsColumnsHeld | Kernel::NormalizeColumnsHeld => {
                include_str!("../shaders/columns_held.wgsl")
            }
        }
    }

    /// Whether the kernel needs subgroup operations (and subgroup_rows.wgsl).
    pub fn uses_subgroups(self) -> bool {
        matches!(
            self,
            Kernel::RowsSubgroup
                | Kernel::RowsHeld
                | Kernel::PartialsRuns
                | Kernel::NormalizeRunsSubgroup
                | Kernel::PartialsColumnsHeld
                | Kernel::NormalizeColumnsHeld
        )
    }

    /// Whether the kernel holds rows in registers (held_slots.wgsl and the
    /// `HELD_K` override).
    pub fn holds_rows(self) -> bool {
        matches!(
            self,
            Kernel::RowsHeld
                | Kernel::RowsWorkgroupHeld
                | Kernel::PartialsColumnsHeld
                | Kernel::NormalizeColumnsHeld
        )
    }

    /// Whether the kernel can move half-precision x and y as pairs of
    /// vectors ([`Variant::paired`]): the held kernels and the subgroup row
    /// and run kernels.
    pub fn moves_pairs(self) -> bool {
        self.holds_rows()
            || matches!(
                self,
                Kernel::RowsSubgroup | Kernel::PartialsRuns | Kernel::NormalizeRunsSubgroup
            )
    }

    /// WGSL entry point name.
    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::Partials => "partials",
            Kernel::PartialsEach => "partials_each",
            Kernel::PartialsColumns => "partials_columns",
            Kernel::BumpCounter => "bump_counter",
            Kernel::RunningNan => "running_nan",
            Kernel::Shifts => "shifts",
            Kernel::Finalize => "finalize",
            Kernel::FinalizeSerial => "finalize_serial",
            Kernel::FinalizeGroups => "finalize_groups",
            Kernel::EvalStats => "eval_stats",
            Kernel::Normalize => "normalize",
            Kernel::NormalizeRuns => "normalize_runs",
            Kernel::NormalizeColumns => "normalize_columns",
            Kernel::Rows => "rows",
            Kernel::RowsSubgroup => "rows_subgroup",
            Kernel::RowsHeld => "rows_held",
            Kernel::RowsWorkgroupHeld => "rows_workgroup_held",
            Kernel::PartialsRuns => "partials_runs",
            Kernel::NormalizeRunsSubgroup => "normalize_runs_subgroup",
            Kernel::PartialsColumnsHeld => "partials_columns_held",
            Kernel::NormalizeColumnsHeld => "normalize_columns_held",
        }
    }
}

/// Where the affine parameters of four consecutive elements are: the
/// `AFFINE_MODE` pipeline constant of the forward kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AffineMode {
    /// One parameter per element of the group's row (affine_div = 1:
    /// LayerNorm, RMSNorm): four consecutive elements read one vector.
    PerElement,
    /// One parameter per run of B elements, B a multiple of four
    /// (BatchNorm, InstanceNorm, GroupNorm with one channel per group).
    PerRun,
    /// Anything else: each element's parameter index by division.
    General,
    /// One parameter per a multiple of four elements that is not a run
    /// (channels-first GroupNorm: a channel of H·W elements, several per
    /// group): four aligned elements share one, found by one division.
    PerQuad,
}

impl AffineMode {
    /// The mode of a view with `affine_div` elements per parameter and runs
    /// of `b` elements.
    pub fn of(affine_div: usize, b: usize) -> AffineMode {
        if affine_div <= 1 {
            AffineMode::PerElement
        } else if affine_div == b && b.is_multiple_of(4) {
            AffineMode::PerRun
        } else if affine_div.is_multiple_of(4) {
            AffineMode::PerQuad
        } else {
            AffineMode::General
        }
    }
}

/// The facts of a forward call that a pipeline is compiled for, as WGSL
/// override constants (`common.wgsl`): branches on them fold away instead
/// of running in every iteration of a hot loop. Kernels that do not read a
/// fact get its default, so they are not compiled twice for nothing
/// ([`Variant::for_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    pub weight: bool,
    pub bias: bool,
    pub rms: bool,
    pub affine: AffineMode,
    /// Rows the subgroup row kernel walks at a time (`ROWS_SG_R`): 1, or
    /// [`ROWS_SG_STEP`] when every row has the same affine parameters.
    pub rows_per_step: u32,
    /// Vectors of a row each lane of the held-row kernel keeps (`HELD_K`,
    /// at most [`HELD_SLOTS`]); 0 for every other kernel.
    pub held_vectors: u32,
    /// Whether the kernel moves x and y as pairs of vectors, one 16-byte
    /// access each (`PAIRED_ACCESS`, io_half_pairs.wgsl; only kernels that
    /// [`Kernel::moves_pairs`]): half storage whose rows are whole pairs of
    /// vectors, held slots in adjacent pairs with `held_vectors` even. Not
    /// an override: it picks the source.
    pub paired: bool,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            weight: false,
            bias: false,
            rms: false,
            affine: AffineMode::General,
            rows_per_step: 1,
            held_vectors: 0,
            paired: false,
        }
    }
}

impl Variant {
    /// This variant with the facts `kernel` does not read reset.
    pub fn for_kernel(self, kernel: Kernel) -> Variant {
        let normalizes = matches!(
            kernel,
            Kernel::Normalize
                | Kernel::NormalizeRuns
                | Kernel::NormalizeRunsSubgroup
                | Kernel::NormalizeColumns
                | Kernel::NormalizeColumnsHeld
                | Kernel::Rows
                | Kernel::RowsSubgroup
                | Kernel::RowsHeld
                | Kernel::RowsWorkgroupHeld
        );
        let shifts = !matches!(
            kernel,
            Kernel::BumpCounter
                | Kernel::RunningNan
                | Kernel::EvalStats
                | Kernel::Normalize
                | Kernel::NormalizeRuns
                | Kernel::NormalizeRunsSubgroup
                | Kernel::NormalizeColumns
                | Kernel::NormalizeColumnsHeld
        );
        let default = Variant::default();
        Variant {
            weight: normalizes && self.weight,
            bias: normalizes && self.bias,
            rms: shifts && self.rms,
            affine: if normalizes {
                self.affine
            } else {
                default.affine
            },
            rows_per_step: if kernel == Kernel::RowsSubgroup {
                self.rows_per_step
            } else {
                default.rows_per_step
            },
            held_vectors: if kernel.holds_rows() {
                self.held_vectors
            } else {
                default.held_vectors
            },
            paired: kernel.moves_pairs() && self.paired,
        }
    }

    /// The override constants of this variant.
    pub fn constants(&self) -> [(&'static str, f64); 6] {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mode = match self.affine {
            AffineMode::PerElement => 0.0,
            AffineMode::PerRun => 1.0,
            AffineMode::General => 2.0,
            AffineMode::PerQuad => 3.0,
        };
        [
            ("HAS_WEIGHT", flag(self.weight)),
            ("HAS_BIAS", flag(self.bias)),
            ("IS_RMS", flag(self.rms)),
            ("AFFINE_MODE", mode),
            ("ROWS_SG_R", self.rows_per_step as f64),
            ("HELD_K", self.held_vectors as f64),
        ]
    }
}

/// The f32 <-> f16/bf16 conversions, shared by the forward's io files and
/// the backward ([`crate::backward::source`]): one copy of the hand-written
/// rounding, prepended to every kernel.
pub(crate) const HALF_CONVERT: &str = include_str!("../shaders/half_convert.wgsl");

/// Exact division by a per-dispatch divisor (`fast_div`, divisors from
/// [`crate::engine::fast_divisor`]), shared by the forward and the backward.
pub(crate) const FAST_DIV: &str = include_str!("../shaders/fast_div.wgsl");

/// Compensated sums for the statistics' accumulators, shared by the forward
/// and the backward.
pub(crate) const COMPENSATED: &str = include_str!("../shaders/compensated.wgsl");

/// How the subgroup row kernels, forward and backward, spread rows over
/// subgroups (needs subgroup operations: only their sources include it).
pub(crate) const SUBGROUP_ROWS: &str = include_str!("../shaders/subgroup_rows.wgsl");

/// The slots of rows held in registers, shared by the forward and backward
/// held-row kernels (they need `load_x4` and the `HELD_K` override).
pub(crate) const HELD_SLOTS_SOURCE: &str = include_str!("../shaders/held_slots.wgsl");

/// The workgroup-memory sum of the workgroup-held row kernels, forward and
/// backward (needs the `ROWS_WG_HELD` constant).
pub(crate) const WORKGROUP_TOTAL: &str = include_str!("../shaders/workgroup_total.wgsl");

/// The f16 or bf16 format of the half io files (`unpack_half2`,
/// `pack_half4`, `half_bits`), at the head of [`io_source`]; empty for f32.
fn half_format(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "",
        DType::F16 => include_str!("../shaders/half_f16.wgsl"),
        DType::BF16 => include_str!("../shaders/half_bf16.wgsl"),
    }
}

/// The io files of a module, one per storage: the forward's of x and y
/// ([`FORWARD_IO`]), the backward's of x, grad_output and grad_input.
pub(crate) struct IoFiles {
    pub f32: &'static str,
    pub half: &'static str,
    /// Half storage bound as vec4<u32>, one access per two vectors.
    pub half_pairs: &'static str,
    /// The eight-element accesses of `f32` and `half`, made of two.
    pub single_access: &'static str,
}

/// The forward's io files.
const FORWARD_IO: IoFiles = IoFiles {
    f32: include_str!("../shaders/io_f32.wgsl"),
    half: include_str!("../shaders/io_half.wgsl"),
    half_pairs: include_str!("../shaders/io_half_pairs.wgsl"),
    single_access: include_str!("../shaders/single_access.wgsl"),
};

/// The storage source of `files` for `dtype`: with `paired`, half storage
/// bound as vec4<u32>, one access per two vectors (`PAIRED_ACCESS`,
/// [`Variant::paired`]); otherwise one vector per access, the
/// eight-element accesses made of two. The half format file comes first.
pub(crate) fn io_source(dtype: DType, paired: bool, files: &IoFiles) -> String {
    let io = match (dtype, paired) {
        (DType::F32, _) => files.f32,
        (_, false) => files.half,
        (_, true) => files.half_pairs,
    };
    let single = if dtype == DType::F32 || !paired {
        files.single_access
    } else {
        ""
    };
    [half_format(dtype), io, single].join("\n")
}

/// The complete WGSL source of `kernel` for storage dtype `dtype`; with
/// `paired`, a kernel that [`Kernel::moves_pairs`] moves half x and y as
/// pairs of vectors ([`Variant::paired`]; the flag changes nothing for f32
/// or other kernels).
pub fn source(kernel: Kernel, dtype: DType, paired: bool) -> String {
    let prelude = format!(
        "const STATS_WG: u32 = {STATS_WG}u;\n\
         const STATS_PER_THREAD: u32 = {STATS_PER_THREAD}u;\n\
         const FINALIZE_WG: u32 = {FINALIZE_WG}u;\n\
         const NORMALIZE_WG: u32 = {NORMALIZE_WG}u;\n\
         const NORMALIZE_VEC4: u32 = {NORMALIZE_VEC4}u;\n\
         const RUNS_WG: u32 = {RUNS_WG}u;\n\
         const ROWS_WG: u32 = {ROWS_WG}u;\n\
         const ROWS_CACHE: u32 = {ROWS_CACHE}u;\n\
         const ROWS_SG_WG: u32 = {ROWS_SG_WG}u;\n\
         const COLUMN_PREFIX: u32 = {COLUMN_PREFIX}u;\n\
         const ROWS_WG_HELD: u32 = {ROWS_WG_HELD}u;\n"
    );
    let io = io_source(dtype, paired && kernel.moves_pairs(), &FORWARD_IO);
    [
        prelude.as_str(),
        HALF_CONVERT,
        FAST_DIV,
        COMPENSATED,
        io.as_str(),
        include_str!("../shaders/common.wgsl"),
        if kernel.uses_subgroups() {
            SUBGROUP_ROWS
        } else {
            ""
        },
        if kernel.holds_rows() {
            HELD_SLOTS_SOURCE
        } else {
            ""
        },
        if kernel.holds_rows() {
            include_str!("../shaders/held_stores.wgsl")
        } else {
            ""
        },
        if kernel == Kernel::RowsWorkgroupHeld {
            WORKGROUP_TOTAL
        } else {
            ""
        },
        kernel.file(),
    ]
    .join("\n")
}

/// A 2-D grid of at most [`MAX_GRID_DIM`] workgroups per dimension covering
/// `workgroups` workgroups; shaders compute the linear index and skip the
/// surplus.
pub fn grid(workgroups: u32) -> (u32, u32) {
    if workgroups <= MAX_GRID_DIM {
        (workgroups, 1)
    } else {
        let y = workgroups.div_ceil(MAX_GRID_DIM);
        (workgroups.div_ceil(y), y)
    }
}

/// The uniform buffer holding one dispatch's `params` (binding 0 of
/// [`PipelineSet::bind_group`]). It is never written again, so bind groups
/// with the same parameters may share it.
pub(crate) fn uniform_buffer(device: &wgpu::Device, label: &str, params: &[u8]) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: params,
        usage: wgpu::BufferUsages::UNIFORM,
    })
}

/// A bind group layout of one uniform (binding 0) and eight storage
/// buffers (bindings 1..=8, writable where `writable[i - 1]`), and the
/// pipelines built on it: each built once per (key, dtype) on first use
/// and kept for the context's lifetime. The forward and the backward
/// kernels each have one; the forward's key includes its [`Variant`].
pub(crate) struct PipelineSet<K> {
    layout: wgpu::PipelineLayout,
    pub(crate) bind_group_layout: wgpu::BindGroupLayout,
    pipelines: Mutex<HashMap<(K, DType), Arc<wgpu::ComputePipeline>>>,
}

impl<K: Copy + Eq + std::hash::Hash> PipelineSet<K> {
    pub(crate) fn new(device: &wgpu::Device, label: &str, writable: [bool; 8]) -> Self {
        let entry = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![entry(0, wgpu::BufferBindingType::Uniform)];
        entries.extend(writable.iter().enumerate().map(|(i, &w)| {
            entry(
                i as u32 + 1,
                wgpu::BufferBindingType::Storage { read_only: !w },
            )
        }));
        let bind_group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(label),
            entries: &entries,
        });
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &[Some(&bind_group_layout)],
            immediate_size: 0,
        });
        PipelineSet {
            layout,
            bind_group_layout,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    /// A bind group of this set's layout: `uniform` (binding 0, from
    /// [`uniform_buffer`]) and the eight storage bindings 1..=8 in
    /// order.
    pub(crate) fn bind_group(
        &self,
        device: &wgpu::Device,
        label: &str,
        uniform: &wgpu::Buffer,
        storage: [wgpu::BindingResource<'_>; 8],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = std::iter::once(uniform.as_entire_binding())
            .chain(storage)
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource,
            })
            .collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &self.bind_group_layout,
            entries: &entries,
        })
    }

    /// The pipeline of `entry_point` for (`key`, `dtype`), compiling
    /// `source()` with the override `constants` the first time.
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        key: K,
        dtype: DType,
        entry_point: &str,
        constants: &[(&str, f64)],
        source: impl FnOnce() -> String,
    ) -> Arc<wgpu::ComputePipeline> {
        let mut map = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((key, dtype))
            .or_insert_with(|| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(entry_point),
                    source: wgpu::ShaderSource::Wgsl(source().into()),
                });
                Arc::new(
                    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(entry_point),
                        layout: Some(&self.layout),
                        module: &module,
                        entry_point: Some(entry_point),
                        compilation_options: wgpu::PipelineCompilationOptions {
                            constants,
                            ..Default::default()
                        },
                        cache: None,
                    }),
                )
            })
            .clone()
    }
}

/// The forward kernels' pipelines: x (1), γ (3), β (4) read; y (2), running
/// mean/var (5, 6), the counter (7) and the scratch (8) written.
pub(crate) struct PipelineCache(PipelineSet<(Kernel, Variant)>);

impl PipelineCache {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        PipelineCache(PipelineSet::new(
            device,
            "gpunorm forward",
            [false, true, false, false, true, true, true, true],
        ))
    }

    pub(crate) fn set(&self) -> &PipelineSet<(Kernel, Variant)> {
        &self.0
    }

    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        kernel: Kernel,
        variant: Variant,
        dtype: DType,
    ) -> Arc<wgpu::ComputePipeline> {
        let variant = variant.for_kernel(kernel);
        self.0.get(
            device,
            (kernel, variant),
            dtype,
            kernel.entry_point(),
            &variant.constants(),
            || source(kernel, dtype, variant.paired),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `main_body` (WGSL, the body of a compute entry point of one
    /// invocation per input vector; `input` and `output` are arrays of
    /// vec4<u32>, `i` the vector's index and `n4` the count) after
    /// `library`, on `bits` (a multiple of four), writing `outputs` vectors
    /// per input vector: output k of vector i at `output[k * n4 + i]`.
    /// Returns the outputs, each as long as `bits`.
    fn run_on_device(
        library: &str,
        main_body: &str,
        bits: &[u32],
        outputs: usize,
    ) -> Vec<Vec<u32>> {
        use wgpu::util::DeviceExt;
        let ctx = crate::Context::new().unwrap();
        let device = ctx.device();
        let src = format!(
            "{library}
@group(0) @binding(0) var<storage, read> input: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> output: array<vec4<u32>>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {{
    let n4 = arrayLength(&input);
    let i = id.x;
    if (i >= n4) {{
        return;
    }}
{main_body}
}}"
        );
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(bits),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let out_bytes = (4 * outputs * bits.len()) as u64;
        let output = ctx.create_buffer("outputs", out_bytes).unwrap();
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: input.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: output.as_entire_binding(),
                },
            ],
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups((bits.len() as u32 / 4).div_ceil(64), 1, 1);
        }
        ctx.submit_and_wait(encoder).unwrap();
        let bytes = pollster::block_on(ctx.read_buffer(&output, 0, out_bytes)).unwrap();
        let all: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        let n = bits.len();
        (0..outputs)
            .map(|k| all[k * n..(k + 1) * n].to_vec())
            .collect()
    }

    /// Runs half_convert.wgsl on `bits` (f32 bit patterns, a multiple of
    /// four of them): per value its f16 and bf16 bits from the scalar and
    /// from the four-lane functions.
    fn convert_on_device(bits: &[u32]) -> [Vec<u32>; 4] {
        let body = "    let v = bitcast<vec4<f32>>(input[i]);
    output[i] = vec4<u32>(f16_bits(v.x), f16_bits(v.y), f16_bits(v.z), f16_bits(v.w));
    output[n4 + i] = f16_bits4(v);
    output[2u * n4 + i] = vec4<u32>(bf16_bits(v.x), bf16_bits(v.y), bf16_bits(v.z), bf16_bits(v.w));
    output[3u * n4 + i] = bf16_bits4(v);";
        let mut out = run_on_device(HALF_CONVERT, body, bits, 4).into_iter();
        std::array::from_fn(|_| out.next().unwrap())
    }

    #[test]
    fn compensated_arithmetic_keeps_its_low_parts_on_the_device() {
        // A compiler that reassociated float arithmetic (lavapipe does,
        // unless opaque() stops it) would fold the low parts to zero and
        // leave the statistics with plain f32 sums: each input vector
        // (a, b, c, d) gives TwoSum(a, b), the carry of a + b in a
        // compensated sum and TwoProduct(c, d).
        let tiny = 2f32.powi(-30);
        let c = 1.0 + 2f32.powi(-12);
        let inputs: [[f32; 4]; 3] = [[1.0, tiny, c, c], [-3.0, 1e-9, 1.5, 1.0 / 3.0], [0.0; 4]];
        let bits: Vec<u32> = inputs.iter().flatten().map(|v| v.to_bits()).collect();
        let body = "    let v = bitcast<vec4<f32>>(input[i]);
    let s = two_sum(v.x, v.y);
    let k = add_compensated(add_compensated(Compensated(0.0, 0.0), v.x), v.y);
    output[i] = bitcast<vec4<u32>>(vec4<f32>(s, k.sum, k.carry));
    output[n4 + i] = bitcast<vec4<u32>>(vec4<f32>(two_product(v.z, v.w), 0.0, 0.0));";
        let library = compensated_library();
        let out = run_on_device(&library, body, &bits, 2);
        let f = |k: usize, i: usize| f32::from_bits(out[k][i]) as f64;
        for (row, v) in inputs.iter().enumerate() {
            let i = 4 * row;
            let exact = v[0] as f64 + v[1] as f64;
            assert_eq!(f(0, i) + f(0, i + 1), exact, "two_sum{v:?}");
            assert_eq!(f(0, i + 2) + f(0, i + 3), exact, "add_compensated{v:?}");
            let product = v[2] as f64 * v[3] as f64;
            assert_eq!(f(1, i) + f(1, i + 1), product, "two_product{v:?}");
        }
        // The first row's low parts are not zero: they were kept.
        assert_eq!(f(0, 1), tiny as f64);
        assert_ne!(f(1, 1), 0.0);
    }

    #[test]
    fn half_conversions_round_to_nearest_even_like_the_half_crate() {
        // Every f16 value, the midpoints to its neighbours and one f32 ulp
        // either side of them (the rounding boundaries), both signs, plus
        // infinities, NaNs and pseudo-random bit patterns.
        let mut bits = Vec::new();
        for h in 0u16..0x7c00 {
            let v = half::f16::from_bits(h).to_f32();
            let mid = ((v as f64 + half::f16::from_bits(h + 1).to_f64()) / 2.0) as f32;
            for x in [v, mid] {
                let b = x.to_bits();
                bits.extend([b, b.wrapping_sub(1), b + 1]);
            }
        }
        bits.extend([
            0x7f80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0x7fff_ffff,
            0x477f_f000,
            0x477f_efff,
        ]);
        let mut state = 0x2545_f491_u32;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            bits.push(state);
        }
        let positive = bits.len();
        bits.extend_from_within(..positive);
        for b in &mut bits[positive..] {
            *b |= 0x8000_0000;
        }
        bits.resize(bits.len().next_multiple_of(4), 0);
        let [f16_scalar, f16_vec, bf16_scalar, bf16_vec] = convert_on_device(&bits);
        for (i, &b) in bits.iter().enumerate() {
            let v = f32::from_bits(b);
            let f16_want = half::f16::from_f32(v);
            let bf16_want = half::bf16::from_f32(v);
            for (what, got) in [("f16_bits", f16_scalar[i]), ("f16_bits4", f16_vec[i])] {
                let got = half::f16::from_bits(got as u16);
                assert!(
                    got.to_bits() == f16_want.to_bits() || (got.is_nan() && f16_want.is_nan()),
                    "{what}({v:e} = {b:#010x}): {:#06x}, want {:#06x}",
                    got.to_bits(),
                    f16_want.to_bits()
                );
            }
            for (what, got) in [("bf16_bits", bf16_scalar[i]), ("bf16_bits4", bf16_vec[i])] {
                let got = half::bf16::from_bits(got as u16);
                assert!(
                    got.to_bits() == bf16_want.to_bits() || (got.is_nan() && bf16_want.is_nan()),
                    "{what}({v:e} = {b:#010x}): {:#06x}, want {:#06x}",
                    got.to_bits(),
                    bf16_want.to_bits()
                );
            }
        }
    }

    /// compensated.wgsl with the opaque zero its kernels supply.
    fn compensated_library() -> String {
        format!(
            "{COMPENSATED}
fn opaque_zero() -> u32 {{
    return select(0u, 1u, arrayLength(&input) == 0xffffffffu);
}}"
        )
    }

    #[test]
    fn refined_rsqrt_rounds_to_nearest() {
        // Variances over 40 binades. lavapipe's own 1/sqrt(v) was 1.4 ulps
        // off at worst here, enough to move f16 outputs near zero.
        let mut bits = Vec::new();
        let mut state = 0x9e37_79b9_u32;
        for _ in 0..4096 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let v = 2f32.powf((state % 40_000) as f32 / 1000.0 - 20.0);
            bits.push(v.to_bits());
        }
        let library = compensated_library();
        let body = "    let v = bitcast<vec4<f32>>(input[i]);
    output[i] = bitcast<vec4<u32>>(vec4<f32>(refined_rsqrt(v.x), refined_rsqrt(v.y), refined_rsqrt(v.z), refined_rsqrt(v.w)));
";
        let out = run_on_device(&library, body, &bits, 1);
        for (i, &b) in bits.iter().enumerate() {
            let exact = 1.0 / (f32::from_bits(b) as f64).sqrt();
            let below = (exact as f32).to_bits();
            let ulp = (f32::from_bits(below + 1) - f32::from_bits(below)) as f64;
            let err = (f32::from_bits(out[0][i]) as f64 - exact).abs() / ulp;
            assert!(
                err <= 0.5 + 1e-3,
                "refined_rsqrt({}): {err} ulps",
                f32::from_bits(b)
            );
        }
    }

    #[test]
    fn affine_mode_follows_the_parameter_layout() {
        assert_eq!(AffineMode::of(1, 1024), AffineMode::PerElement);
        assert_eq!(AffineMode::of(3136, 3136), AffineMode::PerRun);
        // A run of odd length cannot share one parameter per vec4.
        assert_eq!(AffineMode::of(9, 9), AffineMode::General);
        // GroupNorm: one parameter per channel, several channels per run.
        assert_eq!(AffineMode::of(64, 512), AffineMode::PerQuad);
        assert_eq!(AffineMode::of(81, 324), AffineMode::General);
    }

    #[test]
    fn kernels_are_compiled_only_for_the_facts_they_read() {
        let full = Variant {
            weight: true,
            bias: true,
            rms: true,
            affine: AffineMode::PerElement,
            rows_per_step: ROWS_SG_STEP,
            held_vectors: HELD_SLOTS,
            paired: true,
        };
        assert_eq!(
            full.for_kernel(Kernel::RowsSubgroup),
            Variant {
                held_vectors: 0,
                ..full
            }
        );
        assert_eq!(
            full.for_kernel(Kernel::RowsHeld),
            Variant {
                rows_per_step: 1,
                ..full
            }
        );
        assert_eq!(
            full.for_kernel(Kernel::Rows),
            Variant {
                rows_per_step: 1,
                held_vectors: 0,
                paired: false,
                ..full
            }
        );
        assert_eq!(
            full.for_kernel(Kernel::Partials),
            Variant {
                rms: true,
                ..Variant::default()
            }
        );
        assert_eq!(
            full.for_kernel(Kernel::NormalizeRuns),
            Variant {
                rms: false,
                rows_per_step: 1,
                held_vectors: 0,
                paired: false,
                ..full
            }
        );
        assert_eq!(full.for_kernel(Kernel::EvalStats), Variant::default());
    }

    #[test]
    fn grid_covers_every_workgroup_within_the_dimension_limit() {
        for n in [1, 65535, 65536, 200_000, 4_000_000_000] {
            let (x, y) = grid(n);
            assert!(x <= MAX_GRID_DIM && y <= MAX_GRID_DIM);
            assert!(x as u64 * y as u64 >= n as u64);
        }
    }
}
