//! The statistics engine: plans and records one forward pass of any
//! normalization on its `[P, A, G, B]` view (DESIGN.md, "data flow").
//!
//! The plan is a pure function of the view and the mode ([`plan_forward`]), so
//! tests and the bench can see which kernels run without a device.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels::{self, Kernel};
use crate::norm::{Affine, RunningStats};
use crate::tensor::{DType, GpuTensor};
use crate::view::View;

/// Where a forward pass takes its mean and variance from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsSource {
    /// The statistics of the batch itself.
    Batch,
    /// The running statistics (eval mode).
    Running,
}

/// How the running statistics are updated after a batch-statistics forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningUpdate {
    /// new = keep·old + take·batch.
    pub keep: f32,
    /// Weight of the batch value.
    pub take: f32,
    /// torch's `momentum=None`: take = 1 / num_batches_tracked.
    pub cumulative: bool,
    /// Update the running variance with the unbiased (n-1) variance.
    pub unbiased: bool,
}

/// Everything the engine needs to know about one forward call, besides the
/// buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardSpec {
    pub view: View,
    /// Storage dtype of x and y.
    pub dtype: DType,
    /// RMSNorm: no centering, rstd = 1/sqrt(mean(x²) + eps).
    pub rms: bool,
    pub eps: f32,
    pub source: StatsSource,
    /// Running-stat update (batch statistics only).
    pub update: Option<RunningUpdate>,
    /// Increment num_batches_tracked on the device.
    pub bump_counter: bool,
    /// An empty input sets the running statistics to NaN (a training step
    /// of torch's tracked InstanceNorm on an empty batch, or of Keras's
    /// BatchNormalization on an empty input); ignored otherwise.
    pub empty_batch_nan: bool,
    /// Batch statistics of zero variance with eps 0 get rstd 0, not inf:
    /// torch's InstanceNorm (its batch-norm kernel) then gives β and zero
    /// gradients for a constant group, where the other ops give NaN.
    pub zero_rstd: bool,
}

impl ForwardSpec {
    /// Whether the pass writes the running statistics: an update from batch
    /// statistics, or the NaN of an empty training batch (an empty batch
    /// updates nothing else: [`plan_forward_chunked`]).
    pub fn updates_running(&self) -> bool {
        if self.view.numel() == 0 {
            self.empty_batch_nan
        } else {
            self.update.is_some()
        }
    }
}

/// One recorded dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    pub kernel: Kernel,
    pub workgroups: u32,
    /// Which chunk of x and y the dispatch binds (0 unless the tensor is
    /// larger than one storage binding).
    pub chunk: u32,
}

/// How a tensor larger than one storage binding is split: consecutive
/// ranges of `elems` elements (the last one shorter), each bound on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunks {
    /// Elements per chunk (a multiple of [`CHUNK_ALIGN`], or of whole outer
    /// blocks with `whole_blocks`).
    pub elems: usize,
    /// Number of chunks (1 when the tensor fits one binding).
    pub count: usize,
    /// Each chunk is whole outer blocks `p` of the view ([`Chunks::of_blocks`]):
    /// its groups are its own, so it runs the kernels of a tensor in one
    /// binding on a view of its own ([`Chunks::block_view`]), its statistics
    /// bound at its first group. Otherwise chunks are element ranges that
    /// cut through groups, for the generic per-element kernels.
    pub whole_blocks: bool,
}

/// Chunk starts are multiples of this many elements: 256 elements are 512 or
/// 1024 bytes, a multiple of every adapter's storage offset alignment (≤ 256
/// bytes), and even, so packed f16/bf16 words never straddle two chunks.
pub const CHUNK_ALIGN: usize = 256;

impl Chunks {
    /// The split of `numel` elements of `dtype` for bindings of at most
    /// `max_binding` bytes.
    pub fn new(numel: usize, dtype: DType, max_binding: u64) -> Chunks {
        let fit = (max_binding as usize / dtype.size()) / CHUNK_ALIGN * CHUNK_ALIGN;
        if numel <= fit || fit == 0 {
            Chunks::whole(numel)
        } else {
            Chunks {
                elems: fit,
                count: numel.div_ceil(fit),
                whole_blocks: false,
            }
        }
    }

    /// One chunk covering everything.
    pub fn whole(numel: usize) -> Chunks {
        Chunks {
            elems: numel.max(1),
            count: 1,
            whole_blocks: false,
        }
    }

    /// A split of `view` into chunks of whole outer blocks (rows of
    /// LayerNorm, samples of InstanceNorm and GroupNorm), as many per chunk
    /// as fit `max_binding` bytes of `dtype` while every chunk's start, in
    /// the tensor and in the statistics (a vec4 per group), is a multiple of
    /// `offset_alignment` bytes (a power of two). None where not even one
    /// aligned run of blocks fits.
    pub fn of_blocks(
        view: &View,
        dtype: DType,
        max_binding: u64,
        offset_alignment: u64,
    ) -> Option<Chunks> {
        let block = view.a * view.g * view.b;
        let block_bytes = (block * dtype.size()) as u64;
        let stats_bytes = 16 * view.g as u64;
        if block_bytes == 0 || view.p == 0 {
            return None;
        }
        // Fewest blocks whose bytes, and whose statistics' bytes, are
        // multiples of the alignment.
        let align = offset_alignment.max(1);
        let step = lcm(
            align / gcd(align, block_bytes),
            align / gcd(align, stats_bytes),
        );
        let per_chunk = (max_binding / block_bytes) / step * step;
        let per_chunk = usize::try_from(per_chunk).ok().filter(|&q| q > 0)?;
        Some(Chunks {
            elems: per_chunk * block,
            count: view.p.div_ceil(per_chunk),
            whole_blocks: true,
        })
    }

    /// The view of chunk `c` of whole blocks: `view` with the chunk's count
    /// of outer blocks.
    pub fn block_view(&self, view: &View, c: usize) -> View {
        let (lo, hi) = self.range(c, view.numel());
        let block = (view.a * view.g * view.b).max(1);
        View {
            p: (hi - lo) / block,
            ..*view
        }
    }

    /// The forward of chunk `c` of whole blocks: `spec` on the chunk's
    /// view, which one binding holds.
    pub fn block_spec(&self, spec: &ForwardSpec, c: usize) -> (ForwardSpec, Chunks) {
        let view = self.block_view(&spec.view, c);
        (ForwardSpec { view, ..*spec }, Chunks::whole(view.numel()))
    }

    /// The first statistics group of chunk `c` of whole blocks.
    pub fn first_group(&self, view: &View, c: usize) -> usize {
        let block = (view.a * view.g * view.b).max(1);
        c * self.elems / block * view.g
    }

    /// Element range of chunk `c` of a tensor of `numel` elements.
    pub fn range(&self, c: usize, numel: usize) -> (usize, usize) {
        let start = c * self.elems;
        (start, (start + self.elems).min(numel))
    }

    fn split(&self) -> bool {
        self.count > 1
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

/// How `normalize_runs` covers the tensor: each run of B contiguous
/// elements (one statistics group, one (p, a, g)) gets `blocks` workgroups,
/// each invocation `vec4` aligned groups of four (an even count: the
/// kernel takes two neighbouring vectors per step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunGrid {
    pub blocks: usize,
    pub vec4: usize,
}

impl RunGrid {
    /// The grid of `normalize_columns`: steps per invocation (in `vec4`),
    /// workgroups per p (in `blocks`). A CPU takes more rows per
    /// invocation: each one first finds the scale and offset of its eight
    /// columns (divisions and gathers), which 8 rows did not amortize on
    /// lavapipe (32 rows: channels-last GroupNorm's normalize 2.6 ->
    /// 1.9 ms; 128 rows, a whole sample of 8x32x32x256 per block: 3.4-4.1
    /// -> 1.7 ms); a GPU keeps more workgroups in flight.
    pub fn columns(view: &View, caps: &Caps) -> RunGrid {
        // Strips of two vectors per row (normalize_columns).
        let strips = (view.g * view.b / 4).div_ceil(2);
        let rows_per_step = kernels::NORMALIZE_WG as usize / strips;
        let steps = caps.cpu_or_gpu(kernels::COLUMN_STEPS_CPU, kernels::NORMALIZE_VEC4) as usize;
        RunGrid {
            blocks: view.a.div_ceil(rows_per_step * steps).max(1),
            vec4: steps,
        }
    }

    /// The grid of `normalize_columns_held`: blocks of
    /// [`kernels::COLUMN_STEPS_CPU`] rows (in `vec4`), each a subgroup's,
    /// per p (in `blocks`).
    pub fn held_columns(view: &View) -> RunGrid {
        let rows = kernels::COLUMN_STEPS_CPU as usize;
        RunGrid {
            blocks: view.a.div_ceil(rows).max(1),
            vec4: rows,
        }
    }

    /// The grid for `view`'s runs (meaningful when [`uses_runs`] holds).
    pub fn of(view: &View) -> RunGrid {
        let per_lane_max = kernels::RUNS_VEC4_MAX as usize;
        let wg = kernels::RUNS_WG as usize;
        let n4 = view.b / 4;
        let blocks = n4.div_ceil(wg * per_lane_max).max(1);
        // Even: the kernel takes two neighbouring vectors per step.
        RunGrid {
            blocks,
            vec4: n4.div_ceil(wg * blocks).max(1).next_multiple_of(2),
        }
    }
}

/// Whether the normalize pass goes run by run: runs long enough to fill a
/// workgroup, aligned to four elements, and the tensor in one binding. The
/// group of a whole workgroup is then known once (no per-element division
/// or gather of statistics).
pub fn uses_runs(view: &View, chunks: &Chunks) -> bool {
    !chunks.split() && view.b.is_multiple_of(4) && view.b >= kernels::RUNS_MIN_LEN as usize
}

/// Whether the normalize pass goes by fixed columns: runs under
/// [`kernels::COLUMNS_MAX_RUN`] elements (channels-last, with several rows
/// per p unless runs are under four elements), one binding, rows of
/// L = G·B elements whose vec4 count divides the workgroup.
pub fn uses_normalize_columns(view: &View, chunks: &Chunks) -> bool {
    let l = view.g * view.b;
    !chunks.split()
        && (view.b < 4 || (view.a > 1 && view.b < kernels::COLUMNS_MAX_RUN as usize))
        && l.is_multiple_of(4)
        && (kernels::NORMALIZE_WG as usize).is_multiple_of(l / 4)
}

/// The normalize pass: run by run, by fixed columns, or one dispatch per
/// chunk of the flat tensor.
fn normalize_dispatches(view: &View, chunks: &Chunks, caps: &Caps) -> Vec<Dispatch> {
    if runs_on_subgroups(view, chunks, caps) {
        return vec![Dispatch {
            kernel: Kernel::NormalizeRunsSubgroup,
            workgroups: block_workgroups(view.p * view.a * view.g, caps) as u32,
            chunk: 0,
        }];
    }
    if held_columns(view, chunks, caps).is_some() {
        return vec![Dispatch {
            kernel: Kernel::NormalizeColumnsHeld,
            workgroups: subgroup_workgroups(view.p * RunGrid::held_columns(view).blocks, caps)
                as u32,
            chunk: 0,
        }];
    }
    if uses_normalize_columns(view, chunks) {
        return vec![Dispatch {
            kernel: Kernel::NormalizeColumns,
            workgroups: (view.p * RunGrid::columns(view, caps).blocks) as u32,
            chunk: 0,
        }];
    }
    if uses_runs(view, chunks) {
        let workgroups = view.p * view.a * view.g * RunGrid::of(view).blocks;
        return vec![Dispatch {
            kernel: Kernel::NormalizeRuns,
            workgroups: workgroups as u32,
            chunk: 0,
        }];
    }
    let per_wg = (kernels::NORMALIZE_WG * kernels::NORMALIZE_PER_THREAD) as usize;
    (0..chunks.count)
        .map(|c| {
            let (lo, hi) = chunks.range(c, view.numel());
            Dispatch {
                kernel: Kernel::Normalize,
                workgroups: (hi - lo).div_ceil(per_wg) as u32,
                chunk: c as u32,
            }
        })
        .collect()
}

/// Partial tiles per group and chunk: a group's elements inside one chunk
/// are a contiguous range of its `j` index, at most the chunk's length.
fn tiles_for(view: &View, chunks: &Chunks, caps: &Caps) -> u32 {
    if column_partials(view, chunks, caps) {
        return view.a.div_ceil(column_rows(caps) as usize).max(1) as u32;
    }
    let len = view.group_len().min(chunks.elems);
    len.div_ceil(kernels::STATS_TILE as usize).max(1) as u32
}

/// Rows per block of the column partials kernel (its `tile_len`).
fn column_rows(caps: &Caps) -> u32 {
    caps.cpu_or_gpu(kernels::COLUMN_ROWS_CPU, kernels::COLUMN_ROWS)
}

/// Partials per group: tiles (row blocks for the column kernel, times B
/// columns) over every chunk, times STATS_WG when each invocation writes
/// its own ([`partials_per_invocation`]). Tested in the order
/// [`plan_forward_chunked`] picks the partials kernel: views that both
/// hold columns and have runs long enough for subgroups (BatchNorm
/// [2, 1, 128] on a CPU) take the column kernel.
fn merge_tiles_for(view: &View, chunks: &Chunks, caps: &Caps) -> u32 {
    let tiles = tiles_for(view, chunks, caps);
    if column_partials(view, chunks, caps) {
        tiles * view.b as u32
    } else if uses_partials_runs(view, chunks, caps) {
        view.a as u32
    } else if partials_per_invocation(view, chunks, caps) {
        tiles * kernels::STATS_WG
    } else {
        tiles * chunk_span(view, chunks) as u32
    }
}

/// The groups `[first, end)` the tiled partials dispatch of chunk `c`
/// covers: with contiguous groups (A = 1, group i on elements
/// [i·B, (i + 1)·B)) those with elements in the chunk, so that a split
/// tensor of many small groups does not launch a workgroup per group and
/// chunk (a 2,000,000x64 LayerNorm's forward on lavapipe: 35 s, now about
/// 11); the slots of a group's other reached chunks are cleared to zero
/// before the pass. Otherwise every group (each writes its slot of every
/// chunk it reaches, zeros included, and skips the rest).
pub fn chunk_groups(view: &View, chunks: &Chunks, c: usize) -> (usize, usize) {
    let groups = view.groups();
    if view.a != 1 || chunks.count <= 1 || view.b == 0 {
        return (0, groups);
    }
    let (lo, hi) = chunks.range(c, view.numel());
    (lo / view.b, hi.div_ceil(view.b).min(groups))
}

/// The most chunks one group's elements reach: a group spans
/// L = (A − 1)·G·B + B consecutive indices, which meet at most
/// ⌊(L − 1) / E⌋ + 2 chunks of E elements. The tiled partials keep a
/// group's tiles of that many chunks (stats.wgsl `chunk_slot`), so a split
/// tensor of many small groups (a 2,000,000x64 LayerNorm in 128 MiB
/// bindings: 2 of its 4 chunks) keeps its scratch near a partial per tile.
pub fn chunk_span(view: &View, chunks: &Chunks) -> usize {
    if chunks.count <= 1 {
        return 1;
    }
    let extent = (view.a.max(1) - 1) * view.g * view.b + view.b.max(1);
    ((extent - 1) / chunks.elems + 2).min(chunks.count)
}

/// Whether the tiled partials pass writes one partial per invocation
/// (`Kernel::PartialsEach`, no workgroup merge): a tensor in one binding
/// whose tiles are mostly full, so that the partials (STATS_WG vec4 per
/// tile) take at most 16 bytes per 16 elements, a quarter of f32 input.
/// Small groups (one short tile each) keep the merged partials: there a
/// partial per invocation would outgrow the input.
fn partials_per_invocation(view: &View, chunks: &Chunks, caps: &Caps) -> bool {
    let tiles = view.groups() * tiles_for(view, chunks, caps) as usize;
    !chunks.split()
        && !column_partials(view, chunks, caps)
        && tiles * kernels::STATS_WG as usize * 16 <= view.numel()
}

/// Whether the statistics come from the column partials kernel: runs
/// shorter than four elements (channels-last), rows of whole vec4s, one
/// binding.
pub fn uses_columns(view: &View, chunks: &Chunks) -> bool {
    !chunks.split() && view.b < 4 && (view.g * view.b).is_multiple_of(4)
}

/// Vectors per lane of the smallest subgroup for which the channels-last
/// forward walks each row with one subgroup whose lanes hold their columns
/// (columns_held.wgsl). Measured on lavapipe (subgroups of 8) against the
/// strip kernels, old and new builds alternated six times: BatchNorm NHWC
/// 32x56x56x64 (2 per lane) train 0.62-0.67 -> 0.69-0.76 of copy, eval
/// 0.79-0.93 -> 1.15-1.2; 128 channels about 5% faster; Keras GroupNorm at
/// 256 channels 0.47 -> 0.75 (median); BatchNorm at 512 channels (16 per
/// lane) slower. One vector per lane would leave lanes idle.
pub(crate) const HELD_COLUMNS_FORWARD: std::ops::RangeInclusive<u32> = 2..=8;

/// The same for the backward's channel kernels (backward_channels_held.wgsl),
/// which hold twice as much per slot: whole backward against the strips, 6
/// and 8 vectors per lane (192 and 256 channels) 10–30% faster; 2 and 4
/// slower; 16 no faster; 32 1.7x slower (the held values spill).
pub(crate) const HELD_COLUMNS_BACKWARD: std::ops::RangeInclusive<u32> = 5..=8;

/// Vectors per lane when rows of `columns` columns are held, if that count
/// is in `range`: CPU adapters with subgroups only. GPUs keep the strips,
/// whose neighbouring invocations read neighbouring strips.
pub(crate) fn held_columns_per_lane(
    columns: usize,
    caps: &Caps,
    range: std::ops::RangeInclusive<u32>,
) -> Option<u32> {
    let lanes = caps.subgroup_min.clamp(1, kernels::ROWS_SG_WG) as usize;
    let per_lane = (columns / 4).div_ceil(lanes) as u32;
    (caps.cpu && caps.subgroups && columns.is_multiple_of(4) && range.contains(&per_lane))
        .then_some(per_lane)
}

/// Vectors per lane when a channels-last forward holds its columns
/// ([`Kernel::PartialsColumnsHeld`], [`Kernel::NormalizeColumnsHeld`]):
/// the views of the column kernels (runs under four elements, or several
/// rows of runs under [`kernels::COLUMNS_MAX_RUN`]) in one binding.
pub fn held_columns(view: &View, chunks: &Chunks, caps: &Caps) -> Option<u32> {
    let channels_last = view.b < 4 || (view.a > 1 && view.b < kernels::COLUMNS_MAX_RUN as usize);
    (!chunks.split() && channels_last)
        .then(|| held_columns_per_lane(view.g * view.b, caps, HELD_COLUMNS_FORWARD))
        .flatten()
}

/// Whether the statistics come from per-column partials over row blocks:
/// the column kernel's views, or held columns.
fn column_partials(view: &View, chunks: &Chunks, caps: &Caps) -> bool {
    uses_columns(view, chunks) || held_columns(view, chunks, caps).is_some()
}

/// Workgroups of [`kernels::ROWS_SG_WG`] invocations giving each of
/// `blocks` blocks a subgroup of the smallest size (larger subgroups are
/// fewer and take several).
pub(crate) fn subgroup_workgroups(blocks: usize, caps: &Caps) -> usize {
    blocks.div_ceil((kernels::ROWS_SG_WG / caps.subgroup_min.max(1)).max(1) as usize)
}

/// What the adapter offers that kernel choice depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Subgroup operations are available (and wanted).
    pub subgroups: bool,
    /// The largest subgroup size the adapter may use.
    pub subgroup_max: u32,
    /// The smallest subgroup size the adapter may use.
    pub subgroup_min: u32,
    /// The adapter is a CPU: fewer workgroups in flight fill it.
    pub cpu: bool,
}

impl Caps {
    /// `cpu` on a CPU adapter, `gpu` otherwise: the sizes that differ
    /// between the two (fewer, longer blocks fill a CPU; a GPU needs
    /// thousands of workgroups in flight).
    pub fn cpu_or_gpu<T>(&self, cpu: T, gpu: T) -> T {
        if self.cpu {
            cpu
        } else {
            gpu
        }
    }

    /// Nothing beyond core WebGPU.
    pub fn baseline() -> Caps {
        Caps {
            subgroups: false,
            subgroup_max: wgpu::MAXIMUM_SUBGROUP_MAX_SIZE,
            subgroup_min: wgpu::MINIMUM_SUBGROUP_MIN_SIZE,
            cpu: false,
        }
    }
}

/// Whether the subgroup row kernel takes a forward the row kernel takes.
fn uses_subgroup_rows(spec: &ForwardSpec, caps: &Caps) -> bool {
    caps.subgroups && spec.view.b.is_multiple_of(4)
}

/// Rows the subgroup row kernel walks at a time: [`kernels::ROWS_SG_STEP`]
/// when every row has the same affine parameters (G = 1: LayerNorm,
/// RMSNorm) and there are enough rows to keep the adapter busy, else 1.
pub fn rows_per_step(view: &View, caps: &Caps) -> u32 {
    let step = kernels::ROWS_SG_STEP as usize;
    let min_steps = caps.cpu_or_gpu(
        kernels::ROWS_SG_MIN_STEPS_CPU,
        kernels::ROWS_SG_MIN_STEPS_GPU,
    );
    if view.g == 1 && view.groups() >= step * min_steps {
        kernels::ROWS_SG_STEP
    } else {
        1
    }
}

/// Vectors of a row each lane keeps when the held-row kernel takes this
/// view (rows_held.wgsl): rows that all share their affine parameters
/// (G = 1), of whole vectors, short enough that [`kernels::HELD_SLOTS`]
/// vectors per lane ([`kernels::HELD_SLOTS_GPU`] on a GPU) cover a row with
/// the smallest subgroup the adapter may use (or the workgroup, when that
/// is smaller). None where it does not apply.
pub fn held_vectors(view: &View, caps: &Caps) -> Option<u32> {
    let n4 = view.b / 4;
    let lanes = caps.subgroup_min.clamp(1, kernels::ROWS_SG_WG);
    let per_lane = n4.div_ceil(lanes as usize);
    (caps.subgroups && view.g == 1 && view.b.is_multiple_of(4) && n4 > 0)
        .then_some(per_lane as u32)
        .filter(|&k| k <= caps.cpu_or_gpu(kernels::HELD_SLOTS, kernels::HELD_SLOTS_GPU))
}

/// Vectors of a row each invocation keeps when the workgroup-held row
/// kernel takes this view (rows_workgroup_held.wgsl): on a GPU, rows of
/// whole vectors too long for a subgroup's slots ([`held_vectors`]) and at
/// most [`kernels::HELD_SLOTS_WORKGROUP`] vectors per invocation of a
/// workgroup of [`kernels::ROWS_WG_HELD`]. Rows with γ and β of their own
/// (GroupNorm, InstanceNorm) qualify as well as LayerNorm/RMSNorm rows: the
/// kernel reads γ and β per row. CPUs keep their subgroup kernels: lavapipe's barriers
/// carry the held state and ran 4x slower. None where it does not apply.
pub fn workgroup_held_vectors(view: &View, caps: &Caps) -> Option<u32> {
    let n4 = view.b / 4;
    let per_invocation = n4.div_ceil(kernels::ROWS_WG_HELD as usize) as u32;
    (!caps.cpu && view.b.is_multiple_of(4) && n4 > 0 && held_vectors(view, caps).is_none())
        .then_some(per_invocation)
        .filter(|&k| k <= kernels::HELD_SLOTS_WORKGROUP)
}

/// The slots of the held kernel that takes `view`, if one does: vectors
/// per lane (`HELD_K`), and whether they are adjacent pairs, one 16-byte
/// access each ([`kernels::Variant::paired`]): half storage whose held
/// rows (B elements, or the G·B of held columns) are a multiple of 8, so
/// that every row starts at a whole pair. Paired slots come in twos, so the
/// count is rounded up to even (still within the slot limits, all even).
/// (0, false) where no held kernel applies.
pub fn held_layout(view: &View, chunks: &Chunks, caps: &Caps, dtype: DType) -> (u32, bool) {
    let (held, row) = match held_vectors(view, caps).or(workgroup_held_vectors(view, caps)) {
        Some(k) => (k, view.b),
        None => match held_columns(view, chunks, caps) {
            Some(k) => (k, view.g * view.b),
            None => return (0, false),
        },
    };
    paired_slots(held, row, dtype)
}

/// `held` slots per lane for rows of `row` elements of `dtype`, and whether
/// they are paired: half storage and rows of a multiple of 8 elements; then
/// the count is rounded up to even ([`held_layout`]; the held backward
/// takes its rows the same way).
pub(crate) fn paired_slots(held: u32, row: usize, dtype: DType) -> (u32, bool) {
    if whole_pairs(row, dtype) {
        (held.next_multiple_of(2), true)
    } else {
        (held, false)
    }
}

/// Whether `kernel` moves half-precision x and y of a forward of `view` as
/// pairs of vectors ([`kernels::Variant::paired`]): a held kernel where its
/// held rows are whole pairs ([`held_layout`]: B elements, or G·B for held
/// columns), the subgroup row and run kernels where rows or runs of B are.
/// Per kernel: a forward may hold columns of whole pairs while its runs are
/// not.
pub fn moves_pairs(
    kernel: Kernel,
    view: &View,
    chunks: &Chunks,
    caps: &Caps,
    dtype: DType,
) -> bool {
    if kernel.holds_rows() {
        held_layout(view, chunks, caps, dtype).1
    } else {
        kernel.moves_pairs() && whole_pairs(view.b, dtype)
    }
}

/// Whether rows (or runs) of `row` elements of `dtype` can move as pairs of
/// vectors, one 16-byte access each: half storage (a vector is 8 bytes) and
/// rows of a multiple of 8 elements, so that every row starts at a pair.
pub(crate) fn whole_pairs(row: usize, dtype: DType) -> bool {
    dtype != DType::F32 && row.is_multiple_of(8)
}

/// Contiguous rows (or runs) each subgroup of the block-walking kernels
/// takes of `count` (held rows forward and backward, runs): a share of
/// [`kernels::BLOCK_SUBGROUPS_CPU`] on a CPU, at most
/// [`kernels::BLOCK_ROWS_MAX_CPU`]; one on a GPU.
pub fn subgroup_block(count: usize, caps: &Caps) -> usize {
    caps.cpu_or_gpu(
        (count / kernels::BLOCK_SUBGROUPS_CPU).clamp(1, kernels::BLOCK_ROWS_MAX_CPU),
        1,
    )
}

/// Workgroups of [`kernels::ROWS_SG_WG`] invocations that give each of
/// `count` rows or runs a subgroup block ([`subgroup_block`]) with
/// subgroups of the smallest size (larger ones are fewer and take more).
pub(crate) fn block_workgroups(count: usize, caps: &Caps) -> usize {
    subgroup_workgroups(count.div_ceil(subgroup_block(count, caps)), caps)
}

/// Whether the normalize pass goes run by run with a subgroup per run
/// ([`Kernel::NormalizeRunsSubgroup`]): CPU adapters with subgroups, runs
/// of whole vectors long enough to fill a subgroup's lanes several times
/// ([`uses_runs`]) and at most [`kernels::ROWS_MAX_LEN`] long, one binding.
///
/// The bound is lavapipe's: an invocation there runs at most 65,535 loop
/// iterations in all and silently stops after them, and a lane walking a
/// subgroup's block of runs (up to [`kernels::BLOCK_ROWS_MAX_CPU`]) of
/// 16,384 elements takes 16,384. A BatchNorm of [1, 1, 4096, 4096] (one
/// run of 16M) left three quarters of its output unwritten; longer runs
/// take the workgroups along runs of [`Kernel::NormalizeRuns`].
fn runs_on_subgroups(view: &View, chunks: &Chunks, caps: &Caps) -> bool {
    caps.cpu
        && caps.subgroups
        && uses_runs(view, chunks)
        && view.b <= kernels::ROWS_MAX_LEN as usize
}

/// Whether the statistics come from a partial per run of B, a subgroup per
/// run ([`Kernel::PartialsRuns`]): wherever the normalize goes by runs on
/// subgroups, whose runs are at most [`kernels::ROWS_MAX_LEN`] elements,
/// the longest the row kernels sum in one subgroup too: each lane sums its
/// share in f32, and a row of 100,000 with an outlier lost digits there.
pub fn uses_partials_runs(view: &View, chunks: &Chunks, caps: &Caps) -> bool {
    runs_on_subgroups(view, chunks, caps)
}

/// Whether the single-dispatch row kernel handles this forward.
pub fn uses_row_kernel(spec: &ForwardSpec) -> bool {
    let v = &spec.view;
    spec.source == StatsSource::Batch
        && spec.update.is_none()
        && v.a == 1
        // Packed halves: a row of odd length would share a word with the next.
        && (spec.dtype == DType::F32 || v.b.is_multiple_of(2))
        && (v.b <= kernels::ROWS_MAX_LEN as usize
            || v.groups() >= kernels::ROWS_MIN_FOR_LONG as usize)
        && v.b <= kernels::ROWS_LONG_MAX as usize
}

/// The dispatches of one forward pass of a tensor that fits one binding.
pub fn plan_forward(spec: &ForwardSpec) -> Vec<Dispatch> {
    plan_forward_chunked(spec, &Chunks::whole(spec.view.numel()), &Caps::baseline())
}

/// The dispatches of one forward pass, in order, with the chunk each binds.
pub fn plan_forward_chunked(spec: &ForwardSpec, chunks: &Chunks, caps: &Caps) -> Vec<Dispatch> {
    if chunks.whole_blocks {
        // Each chunk's blocks are a tensor of their own, in one binding.
        return (0..chunks.count)
            .flat_map(|c| {
                let (chunk, whole) = chunks.block_spec(spec, c);
                plan_forward_chunked(&chunk, &whole, caps)
                    .into_iter()
                    .map(move |d| Dispatch {
                        chunk: c as u32,
                        ..d
                    })
            })
            .collect();
    }
    let v = &spec.view;
    let numel = v.numel();
    let d = |kernel, workgroups: usize, chunk: usize| Dispatch {
        kernel,
        workgroups: workgroups as u32,
        chunk: chunk as u32,
    };
    if numel == 0 {
        let mut plan = Vec::new();
        if spec.bump_counter {
            plan.push(d(Kernel::BumpCounter, 1, 0));
        }
        if spec.empty_batch_nan {
            plan.push(d(
                Kernel::RunningNan,
                v.g.div_ceil(kernels::STATS_WG as usize),
                0,
            ));
        }
        return plan;
    }
    let per_chunk = |kernel, workgroups: &dyn Fn(usize) -> usize| {
        (0..chunks.count)
            .map(move |c| d(kernel, workgroups(c), c))
            .collect::<Vec<_>>()
    };

    match spec.source {
        StatsSource::Running => {
            let mut plan = vec![d(
                Kernel::EvalStats,
                v.groups().div_ceil(kernels::FINALIZE_WG as usize),
                0,
            )];
            plan.extend(normalize_dispatches(v, chunks, caps));
            plan
        }
        StatsSource::Batch if uses_row_kernel(spec) && !chunks.split() => {
            if held_vectors(v, caps).is_some() {
                vec![d(Kernel::RowsHeld, block_workgroups(v.groups(), caps), 0)]
            } else if workgroup_held_vectors(v, caps).is_some() {
                vec![d(Kernel::RowsWorkgroupHeld, v.groups(), 0)]
            } else if uses_subgroup_rows(spec, caps) {
                // Enough workgroups for the largest subgroup size; with
                // smaller subgroups the surplus workgroups find no row.
                let steps_per_wg = (kernels::ROWS_SG_WG / caps.subgroup_max.max(1)).max(1) as usize;
                let rows_per_wg = steps_per_wg * rows_per_step(v, caps) as usize;
                vec![d(Kernel::RowsSubgroup, v.groups().div_ceil(rows_per_wg), 0)]
            } else {
                vec![d(Kernel::Rows, v.groups(), 0)]
            }
        }
        StatsSource::Batch => {
            let tiles = tiles_for(v, chunks, caps) as usize;
            let finalize_wg = if spec.update.is_some() {
                v.g
            } else {
                v.groups()
            };
            let mut plan = Vec::new();
            if chunks.split() {
                let groups_wg = v.groups().div_ceil(kernels::FINALIZE_WG as usize);
                plan.extend(per_chunk(Kernel::Shifts, &|_| groups_wg));
            }
            if held_columns(v, chunks, caps).is_some() {
                plan.push(d(
                    Kernel::PartialsColumnsHeld,
                    subgroup_workgroups(v.p * tiles, caps),
                    0,
                ));
            } else if uses_columns(v, chunks) {
                // One invocation per strip of two vec4 per row block.
                let invocations = v.p * tiles * (v.g * v.b / 4).div_ceil(2);
                plan.push(d(
                    Kernel::PartialsColumns,
                    invocations.div_ceil(kernels::STATS_WG as usize),
                    0,
                ));
            } else if uses_partials_runs(v, chunks, caps) {
                let runs = v.p * v.a * v.g;
                plan.push(d(Kernel::PartialsRuns, block_workgroups(runs, caps), 0));
            } else if partials_per_invocation(v, chunks, caps) {
                plan.push(d(Kernel::PartialsEach, v.groups() * tiles, 0));
            } else {
                plan.extend(per_chunk(Kernel::Partials, &|c| {
                    let (first, end) = chunk_groups(v, chunks, c);
                    (end - first) * tiles
                }));
            }
            // Each output merges its groups' partials (P groups per running
            // channel with an update): serially when they are few.
            let groups_per_output = if spec.update.is_some() { v.p } else { 1 };
            let merged = merge_tiles_for(v, chunks, caps) as usize * groups_per_output;
            let serial_max = caps.cpu_or_gpu(
                kernels::FINALIZE_SERIAL_MAX_CPU,
                kernels::FINALIZE_SERIAL_MAX,
            );
            if merged <= serial_max as usize {
                plan.push(d(
                    Kernel::FinalizeSerial,
                    finalize_wg.div_ceil(kernels::FINALIZE_WG as usize),
                    0,
                ));
            } else if groups_per_output > 1 && finalize_by_groups(groups_per_output, merged) {
                plan.push(d(Kernel::FinalizeGroups, finalize_wg, 0));
            } else {
                plan.push(d(Kernel::Finalize, finalize_wg, 0));
            }
            plan.extend(normalize_dispatches(v, chunks, caps));
            plan
        }
    }
}

/// Whether a running channel's `groups` groups of `merged` partials in all
/// are merged an invocation per group ([`Kernel::FinalizeGroups`]) rather
/// than by a workgroup tree per group, in a loop ([`Kernel::Finalize`]):
/// whichever loops less per invocation. lavapipe stops an invocation's
/// loops after 65,535 iterations: many short groups (a tracked
/// InstanceNorm over thousands of instances) passed it with a tree per
/// group, and few long ones (two instances of 4M elements, 65,536
/// partials each) with an invocation per group.
fn finalize_by_groups(groups: usize, merged: usize) -> bool {
    let per_group = merged / groups.max(1);
    let wg = kernels::FINALIZE_WG as usize;
    // Each merge walks its partials twice (merged_partials in finalize.wgsl).
    let by_groups = groups.div_ceil(wg) * (2 * per_group + 1);
    // A tree of FINALIZE_WG levels' iterations and its own strided loops.
    let by_trees = groups * (2 * per_group.div_ceil(wg) + wg.ilog2() as usize + 2);
    by_groups <= by_trees
}

/// Bytes of scratch (statistics and partials) a forward of `view` split
/// in element ranges (or unsplit) needs, whatever kernels it takes.
pub fn scratch_bytes(view: &View, chunks: &Chunks, caps: &Caps) -> u64 {
    let groups = view.groups() as u64;
    let tiles = merge_tiles_for(view, chunks, caps) as u64;
    16 * (groups + groups * tiles).max(1)
}

/// Bytes of scratch the forward of `spec` split as `chunks` needs: the
/// statistics alone where the row kernels run (they keep no partials),
/// each chunk's scratch from its first group on for chunks of whole blocks
/// (`chunk_scratch`), else [`scratch_bytes`].
pub fn forward_scratch_bytes(spec: &ForwardSpec, chunks: &Chunks, caps: &Caps) -> u64 {
    if chunks.whole_blocks {
        (0..chunks.count)
            .map(|c| {
                let (start, bytes) = chunk_scratch(spec, chunks, c, caps);
                start + bytes
            })
            .max()
            .unwrap_or(16)
    } else if uses_row_kernel(spec) && !chunks.split() {
        16 * spec.view.groups().max(1) as u64
    } else {
        scratch_bytes(&spec.view, chunks, caps)
    }
}

/// Where the scratch of chunk `c` of whole blocks starts and how long it is,
/// in bytes: its statistics (from its first group on), then its partials,
/// which lie over the next chunks' statistics (those chunks run later and
/// write them then).
fn chunk_scratch(spec: &ForwardSpec, chunks: &Chunks, c: usize, caps: &Caps) -> (u64, u64) {
    let (chunk, whole) = chunks.block_spec(spec, c);
    let start = 16 * chunks.first_group(&spec.view, c) as u64;
    (start, forward_scratch_bytes(&chunk, &whole, caps))
}

/// The buffers of one forward call.
pub(crate) struct ForwardBuffers<'a> {
    pub x: &'a GpuTensor,
    pub y: &'a GpuTensor,
    pub weight: Option<&'a GpuTensor>,
    pub bias: Option<&'a GpuTensor>,
    pub running_mean: Option<&'a GpuTensor>,
    pub running_var: Option<&'a GpuTensor>,
    pub counter: Option<&'a wgpu::Buffer>,
    /// Statistics (first `groups` vec4) and partials; at least
    /// [`forward_scratch_bytes`] long.
    pub scratch: &'a wgpu::Buffer,
}

impl<'a> ForwardBuffers<'a> {
    /// The buffers of a layer's forward: its parameters and running
    /// statistics as the kernels bind them (f32: see
    /// [`crate::norm::half_params`]).
    pub(crate) fn new(
        x: &'a GpuTensor,
        y: &'a GpuTensor,
        affine: &'a Affine,
        running: Option<&'a RunningStats>,
        scratch: &'a wgpu::Buffer,
    ) -> Self {
        ForwardBuffers {
            x,
            y,
            weight: affine.weight.as_ref(),
            bias: affine.bias.as_ref(),
            running_mean: running.map(|r| &r.mean),
            running_var: running.map(|r| &r.var),
            counter: running.and_then(|r| r.counter.as_deref()),
            scratch,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    p: u32,
    a: u32,
    g: u32,
    b: u32,
    n_groups: u32,
    total: u32,
    tiles: u32,
    tile_len: u32,
    affine_div: u32,
    flags: u32,
    eps: f32,
    keep: f32,
    take: f32,
    partials_offset: u32,
    chunk_base: u32,
    chunk_len: u32,
    chunk_index: u32,
    merge_tiles: u32,
    run_blocks: u32,
    run_vec4: u32,
    chunk_elems: u32,
    chunk_count: u32,
    chunk_span: u32,
    group_offset: u32,
    div_b: [u32; 4],
    div_g: [u32; 4],
    div_agb: [u32; 4],
    div_affine: [u32; 4],
}

/// Divisor `d` as (d, m, s1, s2) for the shaders' `fast_div`: with
/// l = ceil(log2 d), m = floor(2^32·(2^l − d) / d) + 1, s1 = min(l, 1),
/// s2 = max(l − 1, 0), n / d = (t + ((n − t) >> s1)) >> s2 where
/// t = mulhi(n, m) (Granlund and Montgomery 1994, figure 4.1).
pub fn fast_divisor(d: u32) -> [u32; 4] {
    let d = d.max(1);
    let l = 32 - (d - 1).leading_zeros();
    let m = (((1u64 << 32) * ((1u64 << l) - d as u64)) / d as u64 + 1) as u32;
    [d, m, l.min(1), l.saturating_sub(1)]
}

const FLAG_UPDATE_RUNNING: u32 = 8;
const FLAG_CUMULATIVE: u32 = 16;
const FLAG_UNBIASED: u32 = 32;
const FLAG_BUMP_COUNTER: u32 = 64;
const FLAG_SHIFT_IN_SCRATCH: u32 = 128;
const FLAG_ZERO_RSTD: u32 = 256;

fn to_u32(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::TooLarge {
        what: what.to_string(),
        bytes: n as u64,
        limit: u32::MAX as u64,
        limit_name: "u32 element indexing",
    })
}

/// How x and y are split for `ctx`'s binding limit.
///
/// A split tensor whose outer blocks are independent (batch statistics and
/// no running update, which averages over them) is split between blocks
/// where an aligned run of them fits a binding ([`Chunks::of_blocks`]), so
/// that each chunk runs the kernels of an unsplit tensor: the generic
/// kernels that cut through groups are several times slower.
pub(crate) fn chunks_for(ctx: &Context, spec: &ForwardSpec) -> Chunks {
    let elements = Chunks::new(spec.view.numel(), spec.dtype, ctx.max_storage_binding());
    let independent = spec.source == StatsSource::Batch
        && spec.update.is_none()
        && !spec.bump_counter
        && !spec.empty_batch_nan;
    if elements.split() && independent {
        if let Some(blocks) = Chunks::of_blocks(
            &spec.view,
            spec.dtype,
            ctx.max_storage_binding(),
            ctx.storage_offset_alignment(),
        ) {
            return blocks;
        }
    }
    elements
}

/// Checks the sizes the shaders index with u32 and the buffers' limits.
/// Tensors larger than one binding are split ([`Chunks`]); the scratch must
/// fit one binding.
pub(crate) fn check_limits(ctx: &Context, spec: &ForwardSpec, x: &GpuTensor) -> Result<()> {
    let v = &spec.view;
    to_u32("the input's element count", v.numel())?;
    ctx.check_buffer_size("the input", x.byte_len())?;
    let chunks = chunks_for(ctx, spec);
    let scratch = forward_scratch_bytes(spec, &chunks, &ctx.caps());
    to_u32("the partials count", (scratch / 16) as usize)?;
    ctx.check_size("the statistics scratch", scratch)?;
    if chunks.count > 1 && !x.offset().is_multiple_of(ctx.storage_offset_alignment()) {
        return Err(Error::InvalidArgument(format!(
            "a tensor larger than one storage binding must start at a multiple of {} bytes, got offset {}",
            ctx.storage_offset_alignment(),
            x.offset()
        )));
    }
    Ok(())
}

/// The bind groups a forward recorded (one per chunk) and what they bind.
/// A layer keeps its last ones, and a forward of the same spec over the same
/// buffers reuses them: their uniform holds only what the spec and the
/// adapter's limits determine. So a steady layer recorded into the caller's
/// encoder every frame creates no buffer and no bind group.
#[derive(Debug, Clone)]
pub(crate) struct ForwardBindings {
    key: BindingKey,
    /// The parameters of each chunk: they depend on the spec alone, so a
    /// forward of the same spec over other buffers (a new output) binds them
    /// again instead of creating new ones.
    uniforms: Vec<wgpu::Buffer>,
    groups: Vec<wgpu::BindGroup>,
}

impl ForwardBindings {
    /// The bind groups, one per chunk.
    #[cfg(test)]
    pub(crate) fn groups(&self) -> &[wgpu::BindGroup] {
        &self.groups
    }

    /// The parameter uniforms, one per chunk.
    #[cfg(test)]
    pub(crate) fn uniforms(&self) -> &[wgpu::Buffer] {
        &self.uniforms
    }
}

/// What a forward's bind groups depend on: the context, the spec, whether
/// statistics were preset, and each binding's buffer, offset and length
/// (the key holds the buffers, so their ids cannot be reused while it
/// lives).
#[derive(Debug, Clone, PartialEq)]
struct BindingKey {
    context: u64,
    spec: ForwardSpec,
    preset: bool,
    buffers: Vec<(wgpu::Buffer, u64, u64)>,
}

impl BindingKey {
    fn of(ctx: &Context, spec: &ForwardSpec, bufs: &ForwardBuffers<'_>, preset: bool) -> Self {
        let tensor = |t: Option<&GpuTensor>, slot: usize| match t {
            Some(t) => (t.buffer().as_ref().clone(), t.offset(), t.byte_len()),
            None => (ctx.dummies[slot].clone(), 0, 0),
        };
        let whole = |b: &wgpu::Buffer| (b.clone(), 0, b.size());
        BindingKey {
            context: ctx.uid,
            spec: *spec,
            preset,
            buffers: vec![
                tensor(Some(bufs.x), 1),
                tensor(Some(bufs.y), 2),
                tensor(bufs.weight, 3),
                tensor(bufs.bias, 4),
                tensor(bufs.running_mean, 5),
                tensor(bufs.running_var, 6),
                whole(bufs.counter.unwrap_or(&ctx.dummies[7])),
                whole(bufs.scratch),
            ],
        }
    }
}

/// Records the dispatches of one forward pass into `encoder`, reusing
/// `previous` bind groups when they bind the same. The caller has validated
/// shapes, dtypes and sizes ([`check_limits`]). Returns the dispatches and
/// the bind groups used (none for an empty plan).
pub(crate) fn record_forward(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    spec: &ForwardSpec,
    bufs: &ForwardBuffers<'_>,
    previous: Option<&ForwardBindings>,
) -> (Vec<Dispatch>, Option<ForwardBindings>) {
    record_forward_with(ctx, encoder, spec, bufs, None, previous)
}

/// Statistics of one group merged elsewhere (SyncBatchNorm): the count,
/// mean and M2 over every replica, and this replica's shift (the group's
/// first element here), so the mean is stored as shift + (mean − shift)
/// without losing the digits of a large offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresetStat {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
    pub shift: f32,
}

/// Records a forward whose batch statistics are given (merged from several
/// replicas) instead of computed: the finalize pass turns them into mean and
/// rstd and updates the running statistics, then the normalize pass runs.
pub(crate) fn record_forward_preset(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    spec: &ForwardSpec,
    bufs: &ForwardBuffers<'_>,
    preset: &[PresetStat],
) -> Vec<Dispatch> {
    record_forward_with(ctx, encoder, spec, bufs, Some(preset), None).0
}

/// The dispatches of a forward with preset statistics.
fn plan_preset(spec: &ForwardSpec, chunks: &Chunks, caps: &Caps) -> Vec<Dispatch> {
    let v = &spec.view;
    let numel = v.numel();
    let mut plan = Vec::new();
    if spec.bump_counter {
        plan.push(Dispatch {
            kernel: Kernel::BumpCounter,
            workgroups: 1,
            chunk: 0,
        });
    }
    if numel == 0 {
        // This replica has no rows, but its running statistics still take
        // the global ones, like every other replica's.
        if spec.update.is_some() {
            plan.push(Dispatch {
                kernel: Kernel::Finalize,
                workgroups: v.g as u32,
                chunk: 0,
            });
        }
        return plan;
    }
    let finalize_wg = if spec.update.is_some() {
        v.g
    } else {
        v.groups()
    };
    plan.push(Dispatch {
        kernel: Kernel::Finalize,
        workgroups: finalize_wg as u32,
        chunk: 0,
    });
    plan.extend(normalize_dispatches(v, chunks, caps));
    plan
}

fn record_forward_with(
    ctx: &Context,
    encoder: &mut wgpu::CommandEncoder,
    spec: &ForwardSpec,
    bufs: &ForwardBuffers<'_>,
    preset: Option<&[PresetStat]>,
    previous: Option<&ForwardBindings>,
) -> (Vec<Dispatch>, Option<ForwardBindings>) {
    let chunks = chunks_for(ctx, spec);
    let plan = match preset {
        None => plan_forward_chunked(spec, &chunks, &ctx.caps()),
        Some(_) => plan_preset(spec, &chunks, &ctx.caps()),
    };
    if plan.is_empty() {
        return (plan, None);
    }
    let v = &spec.view;
    if let Some(stats) = preset {
        write_preset(ctx, v, bufs.scratch, stats);
    }
    let key = BindingKey::of(ctx, spec, bufs, preset.is_some());
    let bindings = match previous {
        Some(p) if p.key == key => p.clone(),
        _ => {
            let uniforms = match previous {
                Some(p)
                    if p.key.context == key.context
                        && p.key.spec == key.spec
                        && p.key.preset == key.preset =>
                {
                    p.uniforms.clone()
                }
                _ => forward_uniforms(ctx, spec, &chunks, preset.is_some()),
            };
            ForwardBindings {
                groups: forward_bind_groups(ctx, spec, bufs, &chunks, &uniforms),
                uniforms,
                key,
            }
        }
    };
    let caps = ctx.caps();
    let variant_of = |kernel: Kernel, v: &View, chunks: &Chunks| kernels::Variant {
        weight: bufs.weight.is_some(),
        bias: bufs.bias.is_some(),
        rms: spec.rms,
        affine: kernels::AffineMode::of(v.affine_div, v.b),
        rows_per_step: rows_per_step(v, &caps),
        held_vectors: held_layout(v, chunks, &caps, spec.dtype).0,
        paired: moves_pairs(kernel, v, chunks, &caps, spec.dtype),
    };
    // Chunks of whole blocks run the pipelines of their own plans.
    let views: Vec<(View, Chunks)> = if chunks.whole_blocks {
        (0..chunks.count)
            .map(|c| {
                let (chunk, whole) = chunks.block_spec(spec, c);
                (chunk.view, whole)
            })
            .collect()
    } else {
        vec![(*v, chunks)]
    };
    if chunks.split() && !chunks.whole_blocks && plan.iter().any(|d| d.kernel == Kernel::Partials) {
        // A chunk's partials dispatch covers only the groups with elements
        // in it (chunk_groups): the slots of a group's other reached chunks
        // must read zero.
        let groups = v.groups() as u64;
        let partials = groups * merge_tiles_for(v, &chunks, &ctx.caps()) as u64;
        encoder.clear_buffer(bufs.scratch, 16 * groups, Some(16 * partials));
    }
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("gpunorm forward"),
        timestamp_writes: None,
    });
    for dispatch in &plan {
        let (view, view_chunks) = &views[if chunks.whole_blocks {
            dispatch.chunk as usize
        } else {
            0
        }];
        let variant = variant_of(dispatch.kernel, view, view_chunks);
        let pipeline = ctx
            .pipelines
            .get(&ctx.device, dispatch.kernel, variant, bufs.x.dtype());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bindings.groups[dispatch.chunk as usize], &[]);
        let (gx, gy) = kernels::grid(dispatch.workgroups);
        pass.dispatch_workgroups(gx, gy, 1);
    }
    (plan, Some(bindings))
}

/// Writes preset statistics to the scratch: scratch[group] = (shift, ..)
/// and one partial per group after the groups.
fn write_preset(ctx: &Context, v: &View, scratch: &wgpu::Buffer, stats: &[PresetStat]) {
    let groups = v.groups();
    let mut data = vec![[0f32; 4]; 2 * groups];
    for (group, st) in stats.iter().enumerate().take(groups) {
        data[group] = [st.shift, 0.0, 0.0, 0.0];
        data[groups + group] = [
            st.count as f32,
            (st.mean - st.shift as f64) as f32,
            st.m2 as f32,
            0.0,
        ];
    }
    ctx.queue
        .write_buffer(scratch, 0, bytemuck::cast_slice(&data));
}

/// The parameter uniforms of a forward, one per chunk (`preset`: the
/// statistics were written by [`write_preset`]).
fn forward_uniforms(
    ctx: &Context,
    spec: &ForwardSpec,
    chunks: &Chunks,
    preset: bool,
) -> Vec<wgpu::Buffer> {
    let uniform = |params: &Params| {
        kernels::uniform_buffer(&ctx.device, "gpunorm forward", bytemuck::bytes_of(params))
    };
    if chunks.whole_blocks {
        // Each chunk is a tensor of its own blocks, in one binding (its
        // only chunk, as the kernels see it).
        return (0..chunks.count)
            .map(|c| {
                let (chunk, whole) = chunks.block_spec(spec, c);
                uniform(&forward_params(ctx, &chunk, &whole, preset))
            })
            .collect();
    }
    let v = &spec.view;
    let numel = v.numel();
    let base = forward_params(ctx, spec, chunks, preset);
    (0..chunks.count)
        .map(|c| {
            let (lo, hi) = chunks.range(c, numel);
            uniform(&Params {
                chunk_base: lo as u32,
                chunk_len: (hi - lo) as u32,
                chunk_index: c as u32,
                group_offset: chunk_groups(v, chunks, c).0 as u32,
                ..base
            })
        })
        .collect()
}

/// The parameters of a forward of `spec` split as `chunks`, for its first
/// chunk.
fn forward_params(ctx: &Context, spec: &ForwardSpec, chunks: &Chunks, preset: bool) -> Params {
    let v = &spec.view;
    let mut flags = 0;
    let mut set = |cond: bool, f: u32| {
        if cond {
            flags |= f;
        }
    };
    // With preset statistics the counter is bumped by its own dispatch.
    set(spec.bump_counter && !preset, FLAG_BUMP_COUNTER);
    set(chunks.count > 1 || preset, FLAG_SHIFT_IN_SCRATCH);
    set(spec.zero_rstd, FLAG_ZERO_RSTD);
    let (keep, take) = match spec.update {
        Some(u) => {
            set(true, FLAG_UPDATE_RUNNING);
            set(u.cumulative, FLAG_CUMULATIVE);
            set(u.unbiased, FLAG_UNBIASED);
            (u.keep, u.take)
        }
        None => (1.0, 0.0),
    };
    let numel = v.numel();
    let runs = if held_columns(v, chunks, &ctx.caps()).is_some() {
        RunGrid::held_columns(v)
    } else if uses_normalize_columns(v, chunks) {
        RunGrid::columns(v, &ctx.caps())
    } else {
        RunGrid::of(v)
    };
    let (tiles, merge_tiles) = if preset {
        // write_preset's one partial per group.
        (1, 1)
    } else {
        (
            tiles_for(v, chunks, &ctx.caps()),
            merge_tiles_for(v, chunks, &ctx.caps()),
        )
    };
    Params {
        p: v.p as u32,
        a: v.a as u32,
        g: v.g as u32,
        b: v.b as u32,
        n_groups: v.groups() as u32,
        total: numel as u32,
        tiles,
        // Elements per tile, or rows per block of the column kernel.
        tile_len: if column_partials(v, chunks, &ctx.caps()) {
            column_rows(&ctx.caps())
        } else {
            kernels::STATS_TILE
        },
        affine_div: v.affine_div.max(1) as u32,
        flags,
        eps: spec.eps,
        keep,
        take,
        partials_offset: v.groups() as u32,
        chunk_base: 0,
        chunk_len: numel as u32,
        chunk_index: 0,
        merge_tiles,
        run_blocks: runs.blocks as u32,
        run_vec4: runs.vec4 as u32,
        chunk_elems: chunks.elems as u32,
        chunk_count: chunks.count as u32,
        chunk_span: chunk_span(v, chunks) as u32,
        group_offset: 0,
        div_b: fast_divisor(v.b as u32),
        div_g: fast_divisor(v.g as u32),
        div_agb: fast_divisor((v.a * v.g * v.b) as u32),
        div_affine: fast_divisor(v.affine_div.max(1) as u32),
    }
}

/// The bind groups of a forward, one per chunk: the same buffers, x and y
/// bound to the chunk, with the chunk's uniform.
fn forward_bind_groups(
    ctx: &Context,
    spec: &ForwardSpec,
    bufs: &ForwardBuffers<'_>,
    chunks: &Chunks,
    uniforms: &[wgpu::Buffer],
) -> Vec<wgpu::BindGroup> {
    let numel = bufs.x.numel();
    uniforms
        .iter()
        .enumerate()
        .map(|(c, uniform)| {
            let (lo, hi) = chunks.range(c, numel);
            let stats = chunks
                .whole_blocks
                .then(|| chunk_scratch(spec, chunks, c, &ctx.caps()));
            forward_bind_group(ctx, bufs, uniform, lo, hi, stats)
        })
        .collect()
}

/// The bind group of one chunk: parameters, x and y bound to elements
/// `lo..hi`, the scratch whole or (a chunk of whole blocks) from its
/// statistics on (`(offset, size)` in bytes), the other tensors whole
/// (placeholders where absent).
fn forward_bind_group(
    ctx: &Context,
    bufs: &ForwardBuffers<'_>,
    uniform: &wgpu::Buffer,
    lo: usize,
    hi: usize,
    stats: Option<(u64, u64)>,
) -> wgpu::BindGroup {
    let scratch = match stats {
        Some((offset, size)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: bufs.scratch,
            offset,
            size: wgpu::BufferSize::new(size),
        }),
        None => bufs.scratch.as_entire_binding(),
    };
    ctx.pipelines.set().bind_group(
        &ctx.device,
        "gpunorm forward",
        uniform,
        [
            bufs.x.binding_elements(lo, hi),
            bufs.y.binding_elements(lo, hi),
            GpuTensor::binding_or(bufs.weight, &ctx.dummies[3]),
            GpuTensor::binding_or(bufs.bias, &ctx.dummies[4]),
            GpuTensor::binding_or(bufs.running_mean, &ctx.dummies[5]),
            GpuTensor::binding_or(bufs.running_var, &ctx.dummies[6]),
            bufs.counter.unwrap_or(&ctx.dummies[7]).as_entire_binding(),
            scratch,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(view: View, source: StatsSource, update: bool, dtype: DType) -> ForwardSpec {
        ForwardSpec {
            view,
            dtype,
            rms: false,
            eps: 1e-5,
            source,
            update: update.then_some(RunningUpdate {
                keep: 0.9,
                take: 0.1,
                cumulative: false,
                unbiased: true,
            }),
            bump_counter: update,
            empty_batch_nan: false,
            zero_rstd: false,
        }
    }

    fn kernels_of(spec: &ForwardSpec, chunks: &Chunks, caps: &Caps) -> Vec<Kernel> {
        plan_forward_chunked(spec, chunks, caps)
            .iter()
            .map(|d| d.kernel)
            .collect()
    }

    const SUBGROUPS: Caps = Caps {
        subgroups: true,
        subgroup_max: 32,
        subgroup_min: 32,
        cpu: false,
    };

    /// lavapipe's capabilities: a CPU with subgroups of 8.
    const LAVAPIPE: Caps = Caps {
        subgroup_max: 8,
        subgroup_min: 8,
        cpu: true,
        ..SUBGROUPS
    };

    #[test]
    fn run_grid_covers_each_run_with_few_idle_slots() {
        // BatchNorm planes from 28² to 128²: every vector of the run has a
        // slot, steps are pairs of vectors, and at least three quarters of
        // the slots hold a vector (a workgroup of 256 left 62% of them idle
        // on 28² planes, 1.5x slower on lavapipe).
        for side in [28, 32, 56, 64, 112, 128] {
            let v = View::batch_norm(&[32, 64, side, side], 1);
            let grid = RunGrid::of(&v);
            let slots = grid.blocks * kernels::RUNS_WG as usize * grid.vec4;
            let n4 = v.b / 4;
            assert!(slots >= n4, "{side}: {grid:?}");
            assert!(grid.vec4.is_multiple_of(2) && grid.vec4 <= kernels::RUNS_VEC4_MAX as usize);
            assert!(4 * n4 >= 3 * slots, "{side}: {n4} of {slots}");
        }
    }

    #[test]
    fn rows_sharing_parameters_are_walked_four_at_a_time_when_there_are_enough() {
        let cpu = Caps {
            cpu: true,
            ..SUBGROUPS
        };
        let ln = View::layer_norm(&[64, 1024], 1024);
        assert_eq!(rows_per_step(&ln, &cpu), kernels::ROWS_SG_STEP);
        // A GPU wants more subgroups in flight than 64 rows give in steps of 4.
        assert_eq!(rows_per_step(&ln, &SUBGROUPS), 1);
        assert_eq!(
            rows_per_step(&View::layer_norm(&[4096, 1024], 1024), &SUBGROUPS),
            kernels::ROWS_SG_STEP
        );
        assert_eq!(rows_per_step(&View::layer_norm(&[63, 1024], 1024), &cpu), 1);
        // InstanceNorm: each row has its own channel's γ and β.
        let instance = View::instance_norm(&[64, 64, 1024]);
        assert_eq!(rows_per_step(&instance, &cpu), 1);
    }

    #[test]
    fn short_rows_sharing_parameters_are_held_by_the_smallest_subgroup() {
        let ln = |b| View::layer_norm(&[64, b], b);
        assert_eq!(held_vectors(&ln(256), &LAVAPIPE), Some(8));
        assert_eq!(held_vectors(&ln(260), &LAVAPIPE), Some(9));
        assert_eq!(held_vectors(&ln(4), &LAVAPIPE), Some(1));
        assert_eq!(held_vectors(&ln(1024), &LAVAPIPE), Some(32));
        // 257 vectors: a 33rd per lane of 8.
        assert_eq!(held_vectors(&ln(1028), &LAVAPIPE), None);
        // A GPU holds 8 vectors per lane.
        assert_eq!(held_vectors(&ln(1024), &SUBGROUPS), Some(8));
        assert_eq!(held_vectors(&ln(1028), &SUBGROUPS), None);
        // Odd rows are not whole vectors.
        assert_eq!(held_vectors(&ln(33), &LAVAPIPE), None);
        // A borrowed device may run subgroups of 4; without subgroups the
        // kernel cannot run at all.
        let unknown = Caps {
            subgroups: true,
            ..Caps::baseline()
        };
        assert_eq!(held_vectors(&ln(128), &unknown), Some(8));
        assert_eq!(held_vectors(&ln(256), &unknown), None);
        assert_eq!(held_vectors(&ln(128), &Caps::baseline()), None);
        // A subgroup wider than the workgroup counts the workgroup's lanes.
        let wide = Caps {
            subgroup_min: 128,
            subgroup_max: 128,
            ..SUBGROUPS
        };
        assert_eq!(
            held_vectors(&ln(4 * kernels::ROWS_SG_WG as usize * 8), &wide),
            Some(8)
        );
        // GroupNorm and InstanceNorm rows have their own γ and β.
        assert_eq!(
            held_vectors(&View::instance_norm(&[8, 4, 64]), &LAVAPIPE),
            None
        );
    }

    #[test]
    fn pairs_are_chosen_per_kernel_by_the_rows_it_moves() {
        // A CPU with subgroups of 16 holds BatchNorm's 2 channels of
        // 11x12 (columns of 264 elements, whole pairs) while the runs of
        // 132 are not: the run kernels move single vectors.
        let wide_cpu = Caps {
            subgroup_max: 16,
            subgroup_min: 16,
            ..LAVAPIPE
        };
        let v = View::batch_norm(&[4, 2, 11, 12], 1);
        let whole = Chunks::whole(v.numel());
        let pairs = |kernel| moves_pairs(kernel, &v, &whole, &wide_cpu, DType::F16);
        assert!(held_columns(&v, &whole, &wide_cpu).is_some());
        assert!(pairs(Kernel::NormalizeColumnsHeld));
        assert!(!pairs(Kernel::PartialsRuns));
        assert!(!pairs(Kernel::NormalizeRunsSubgroup));
        // Runs of 128: whole pairs, but not in f32; generic kernels never.
        let v = View::batch_norm(&[4, 2, 8, 16], 1);
        let whole = Chunks::whole(v.numel());
        let pairs = |kernel, dtype| moves_pairs(kernel, &v, &whole, &LAVAPIPE, dtype);
        assert!(pairs(Kernel::PartialsRuns, DType::BF16));
        assert!(!pairs(Kernel::PartialsRuns, DType::F32));
        assert!(!pairs(Kernel::Normalize, DType::F16));
    }

    #[test]
    fn half_storage_holds_rows_of_whole_pairs_in_paired_slots() {
        let ln = |b| View::layer_norm(&[64, b], b);
        let layout = |v: &View, dtype| held_layout(v, &Chunks::whole(v.numel()), &LAVAPIPE, dtype);
        assert_eq!(layout(&ln(256), DType::F16), (8, true));
        assert_eq!(layout(&ln(256), DType::BF16), (8, true));
        // f32 vectors are 16 bytes already.
        assert_eq!(layout(&ln(256), DType::F32), (8, false));
        // 36 vectors: 5 per lane singly, 3 pairs paired.
        assert_eq!(layout(&ln(144), DType::F16), (6, true));
        assert_eq!(layout(&ln(144), DType::F32), (5, false));
        // 65 vectors: a row would start inside a pair.
        assert_eq!(layout(&ln(260), DType::F16), (9, false));
        assert_eq!(layout(&ln(8), DType::F16), (2, true));
        assert_eq!(layout(&ln(1024), DType::F16), (32, true));
        // Held columns count the G·B elements of a row: 72 channels are 18
        // vectors, 3 per lane singly, 2 pairs paired; 40 are 10 (one pair
        // in lanes 0 to 4); 36 are 9.
        let nhwc = |c| View::batch_norm(&[4, 16, 16, c], 3);
        assert_eq!(layout(&nhwc(72), DType::F16), (4, true));
        assert_eq!(layout(&nhwc(72), DType::F32), (3, false));
        assert_eq!(layout(&nhwc(40), DType::F16), (2, true));
        assert_eq!(layout(&nhwc(36), DType::F16), (2, false));
        // The GPU's workgroup-held rows: 516 vectors over 256 invocations.
        let gpu = |v: &View| held_layout(v, &Chunks::whole(v.numel()), &SUBGROUPS, DType::F16);
        assert_eq!(gpu(&ln(2064)), (4, true));
        assert_eq!(gpu(&ln(2068)), (3, false));
        // No held kernel.
        assert_eq!(layout(&ln(33), DType::F16), (0, false));
    }

    #[test]
    fn long_rows_are_held_by_a_workgroup_on_a_gpu_up_to_16_vectors_each() {
        let ln = |b| View::layer_norm(&[64, b], b);
        // A subgroup of 32 holds rows up to 1024.
        assert_eq!(workgroup_held_vectors(&ln(1024), &SUBGROUPS), None);
        assert_eq!(workgroup_held_vectors(&ln(1028), &SUBGROUPS), Some(2));
        assert_eq!(workgroup_held_vectors(&ln(16384), &SUBGROUPS), Some(16));
        assert_eq!(workgroup_held_vectors(&ln(16388), &SUBGROUPS), None);
        // Without subgroups, from the shortest rows.
        assert_eq!(workgroup_held_vectors(&ln(8), &Caps::baseline()), Some(1));
        // Rows of their own γ and β qualify; odd rows and CPUs do not.
        let instance = View::instance_norm(&[8, 4, 4096]);
        assert_eq!(workgroup_held_vectors(&instance, &SUBGROUPS), Some(4));
        assert_eq!(workgroup_held_vectors(&ln(2050), &SUBGROUPS), None);
        let cpu = Caps {
            cpu: true,
            ..SUBGROUPS
        };
        assert_eq!(workgroup_held_vectors(&ln(4096), &cpu), None);
    }

    #[test]
    fn rows_take_one_dispatch_on_subgroups_or_workgroup_memory() {
        let ln = spec(
            View::layer_norm(&[4096, 2048], 2048),
            StatsSource::Batch,
            false,
            DType::F32,
        );
        let whole = Chunks::whole(ln.view.numel());
        // A GPU holds rows of 2048 in a workgroup, with or without
        // subgroups; a CPU walks them on subgroups, reading x twice.
        assert_eq!(
            kernels_of(&ln, &whole, &SUBGROUPS),
            [Kernel::RowsWorkgroupHeld]
        );
        assert_eq!(
            kernels_of(&ln, &whole, &Caps::baseline()),
            [Kernel::RowsWorkgroupHeld]
        );
        assert_eq!(kernels_of(&ln, &whole, &LAVAPIPE), [Kernel::RowsSubgroup]);
        // Past 16 vectors per invocation (16384 elements): a row per
        // subgroup, or per workgroup through workgroup memory.
        let longer = spec(
            View::layer_norm(&[64, 16400], 16400),
            StatsSource::Batch,
            false,
            DType::F32,
        );
        assert_eq!(
            kernels_of(&longer, &whole, &SUBGROUPS),
            [Kernel::RowsSubgroup]
        );
        assert_eq!(
            kernels_of(&longer, &whole, &Caps::baseline()),
            [Kernel::Rows]
        );
        // Rows of 1024 fit 8 vectors per lane of 32.
        let held = spec(
            View::layer_norm(&[4096, 1024], 1024),
            StatsSource::Batch,
            false,
            DType::F32,
        );
        assert_eq!(kernels_of(&held, &whole, &SUBGROUPS), [Kernel::RowsHeld]);
        // Odd rows: no vec4 subgroup kernel; odd half rows: not the row kernel.
        let odd = spec(
            View::layer_norm(&[8, 33], 33),
            StatsSource::Batch,
            false,
            DType::F32,
        );
        assert_eq!(kernels_of(&odd, &whole, &SUBGROUPS), [Kernel::Rows]);
        let odd16 = ForwardSpec {
            dtype: DType::F16,
            ..odd
        };
        // (Short groups: merged partials, not one per invocation.)
        assert_eq!(kernels_of(&odd16, &whole, &SUBGROUPS)[0], Kernel::Partials);
        // Two rows of 70,000: spread over many workgroups instead.
        let long = spec(
            View::layer_norm(&[2, 70_000], 70_000),
            StatsSource::Batch,
            false,
            DType::F32,
        );
        assert_eq!(
            kernels_of(&long, &whole, &SUBGROUPS),
            [
                Kernel::PartialsEach,
                Kernel::Finalize,
                Kernel::NormalizeRuns
            ]
        );
    }

    #[test]
    fn batch_norm_train_is_three_dispatches_and_eval_two() {
        let nchw = View::batch_norm(&[32, 64, 56, 56], 1);
        let nhwc = View::batch_norm(&[32, 56, 56, 64], 3);
        let whole = Chunks::whole(nchw.numel());
        // 25 tiles per channel, a partial per invocation: 1600 partials
        // per channel, merged by a workgroup per channel.
        let train = spec(nchw, StatsSource::Batch, true, DType::F32);
        assert_eq!(
            kernels_of(&train, &whole, &SUBGROUPS),
            [
                Kernel::PartialsEach,
                Kernel::Finalize,
                Kernel::NormalizeRuns
            ]
        );
        // A CPU: a subgroup per run of 56², a partial per run (32 per
        // channel, merged by one invocation each), the normalize run by run
        // on subgroups; 2048 runs in blocks of 32 on 64 subgroups of 8.
        let cpu = Caps {
            subgroup_min: 8,
            subgroup_max: 8,
            cpu: true,
            ..SUBGROUPS
        };
        let plan = plan_forward_chunked(&train, &whole, &cpu);
        let steps: Vec<_> = plan.iter().map(|d| (d.kernel, d.workgroups)).collect();
        assert_eq!(
            steps,
            [
                (Kernel::PartialsRuns, 64 / 8),
                (Kernel::FinalizeSerial, 1),
                (Kernel::NormalizeRunsSubgroup, 64 / 8)
            ]
        );
        assert_eq!(scratch_bytes(&nchw, &whole, &cpu), 16 * (64 + 64 * 32));
        // Channels-last on a CPU: blocks of 256 rows, 392 partials per
        // channel.
        assert_eq!(scratch_bytes(&nhwc, &whole, &cpu), 16 * (64 + 64 * 392));
        // A CPU lane merges those 392 serially; sized for a GPU, 392 take
        // a workgroup tree, as do more than 1024 on a CPU.
        let nhwc_train = spec(nhwc, StatsSource::Batch, true, DType::F32);
        assert_eq!(
            kernels_of(&nhwc_train, &whole, &cpu)[1],
            Kernel::FinalizeSerial
        );
        let gpu_sized_392 = Caps { cpu: false, ..cpu };
        assert_eq!(
            kernels_of(&nhwc_train, &whole, &gpu_sized_392)[1],
            Kernel::Finalize
        );
        let taller = View::batch_norm(&[65, 64, 64, 64], 3);
        let taller_train = spec(taller, StatsSource::Batch, true, DType::F32);
        assert_eq!(
            kernels_of(&taller_train, &Chunks::whole(taller.numel()), &cpu)[1],
            Kernel::Finalize
        );
        // Runs longer than a subgroup sums alone keep the tiles.
        let long = View::instance_norm(&[1, 2, 20_000]);
        let tracked = spec(long, StatsSource::Batch, true, DType::F32);
        assert_eq!(
            kernels_of(&tracked, &Chunks::whole(long.numel()), &cpu)[0],
            Kernel::PartialsEach
        );
        // Their partials take at most a quarter of the f32 input's bytes;
        // groups of nine elements keep merged partials (one per group).
        assert!(scratch_bytes(&nchw, &whole, &Caps::baseline()) <= nchw.numel() as u64);
        let nines = View::batch_norm(&[1, 1000, 3, 3], 1);
        let tiny = spec(nines, StatsSource::Batch, true, DType::F32);
        let nines_whole = Chunks::whole(nines.numel());
        assert_eq!(
            kernels_of(&tiny, &nines_whole, &SUBGROUPS)[0],
            Kernel::Partials
        );
        assert_eq!(
            scratch_bytes(&nines, &nines_whole, &Caps::baseline()),
            16 * 2 * 1000
        );
        // One tile per channel: 64 partials, merged by one invocation each.
        let small = spec(
            View::batch_norm(&[4, 8, 32, 32], 1),
            StatsSource::Batch,
            true,
            DType::F32,
        );
        assert_eq!(
            kernels_of(&small, &whole, &SUBGROUPS),
            [
                Kernel::PartialsEach,
                Kernel::FinalizeSerial,
                Kernel::NormalizeRuns
            ]
        );
        // 6272 column blocks per channel: a workgroup per channel.
        let train = spec(nhwc, StatsSource::Batch, true, DType::F32);
        assert_eq!(
            kernels_of(&train, &whole, &SUBGROUPS),
            [
                Kernel::PartialsColumns,
                Kernel::Finalize,
                Kernel::NormalizeColumns
            ]
        );
        let eval = spec(nchw, StatsSource::Running, false, DType::F32);
        assert_eq!(
            kernels_of(&eval, &whole, &SUBGROUPS),
            [Kernel::EvalStats, Kernel::NormalizeRuns]
        );
    }

    #[test]
    fn channels_last_group_norm_normalizes_by_columns_per_sample() {
        let v = View::group_norm_channels_last(&[32, 56, 56, 64], 32);
        let whole = Chunks::whole(v.numel());
        let plan = plan_forward_chunked(
            &spec(v, StatsSource::Batch, false, DType::F32),
            &whole,
            &SUBGROUPS,
        );
        let last = plan.last().unwrap();
        assert_eq!(last.kernel, Kernel::NormalizeColumns);
        assert_eq!(
            last.workgroups as usize,
            32 * RunGrid::columns(&v, &SUBGROUPS).blocks
        );
    }

    #[test]
    fn cpus_hold_the_columns_of_rows_of_36_to_256_channels() {
        // Keras GroupNorm 8x32x32x256: 8 vectors per lane; partials over 4
        // blocks of 256 rows per sample (32 partials per group, merged
        // serially, an invocation per group), the normalize over 8 blocks
        // of 128 rows per sample, 8 subgroups per workgroup.
        let gn = View::group_norm_channels_last(&[8, 32, 32, 256], 32);
        let whole = Chunks::whole(gn.numel());
        assert_eq!(held_columns(&gn, &whole, &LAVAPIPE), Some(8));
        assert_eq!(merge_tiles_for(&gn, &whole, &LAVAPIPE), 4 * 8);
        let plan = plan_forward_chunked(
            &spec(gn, StatsSource::Batch, false, DType::F32),
            &whole,
            &LAVAPIPE,
        );
        let got: Vec<(Kernel, u32)> = plan.iter().map(|d| (d.kernel, d.workgroups)).collect();
        assert_eq!(
            got,
            [
                (Kernel::PartialsColumnsHeld, 8 * 4 / 8),
                (Kernel::FinalizeSerial, 8 * 32 / kernels::FINALIZE_WG),
                (Kernel::NormalizeColumnsHeld, 8 * 8 / 8)
            ]
        );
        // Eval: the held normalize after the running statistics.
        let nhwc = View::batch_norm(&[32, 14, 14, 256], 3);
        let eval = spec(nhwc, StatsSource::Running, false, DType::F32);
        assert_eq!(
            kernels_of(&eval, &Chunks::whole(nhwc.numel()), &LAVAPIPE),
            [Kernel::EvalStats, Kernel::NormalizeColumnsHeld]
        );
        // The range's edges (2 to 8 vectors per lane); GPUs, no subgroups
        // and split tensors keep the strips.
        for (channels, held) in [
            (32, None),
            (36, Some(2)),
            (64, Some(2)),
            (256, Some(8)),
            (260, None),
        ] {
            let v = View::batch_norm(&[64, channels], 1);
            let chunks = Chunks::whole(v.numel());
            assert_eq!(held_columns(&v, &chunks, &LAVAPIPE), held, "{channels}");
        }
        let no_subgroups = Caps {
            subgroups: false,
            ..LAVAPIPE
        };
        assert_eq!(held_columns(&gn, &whole, &no_subgroups), None);
        assert_eq!(held_columns(&gn, &whole, &SUBGROUPS), None);
        let split = Chunks { count: 2, ..whole };
        assert_eq!(held_columns(&gn, &split, &LAVAPIPE), None);
    }

    #[test]
    fn chunked_tensors_find_shifts_first_and_bind_each_chunk() {
        let view = View::batch_norm(&[16, 64, 250, 300], 1);
        let chunks = Chunks::new(view.numel(), DType::F32, 128 << 20);
        assert_eq!(chunks.count, 3);
        let plan = plan_forward_chunked(
            &spec(view, StatsSource::Batch, true, DType::F32),
            &chunks,
            &SUBGROUPS,
        );
        let kinds: Vec<Kernel> = plan.iter().map(|d| d.kernel).collect();
        assert_eq!(&kinds[..3], [Kernel::Shifts; 3]);
        assert_eq!(&kinds[3..6], [Kernel::Partials; 3]);
        assert_eq!(kinds[6], Kernel::Finalize);
        assert_eq!(&kinds[7..], [Kernel::Normalize; 3]);
        assert_eq!(plan[8].chunk, 1);
    }

    #[test]
    fn chunks_of_whole_blocks_start_aligned_in_the_tensor_and_the_statistics() {
        // Rows of 8192 f32 (32 KiB) in 128 MiB: 4096 rows a chunk.
        let ln = View::layer_norm(&[8192, 8192], 8192);
        let chunks = Chunks::of_blocks(&ln, DType::F32, 128 << 20, 256).unwrap();
        assert_eq!((chunks.elems, chunks.count), (4096 * 8192, 2));
        assert!(chunks.whole_blocks);
        // Rows of 70 f32 (280 bytes): 32 rows align the data and 16 the
        // statistics for a 256-byte alignment, so bindings of 100 rows take
        // 96: 1000 rows are 10 chunks of 96 and one of 40.
        let small = View::layer_norm(&[1000, 70], 70);
        let chunks = Chunks::of_blocks(&small, DType::F32, 100 * 280, 256).unwrap();
        assert_eq!(chunks.elems, 96 * 70);
        assert_eq!(chunks.count, 11);
        let last = chunks.block_view(&small, 10);
        assert_eq!((last.p, last.b), (1000 - 960, 70));
        assert_eq!(chunks.first_group(&small, 10), 960);
        for c in 0..chunks.count {
            assert_eq!((chunks.first_group(&small, c) * 16) % 256, 0);
            assert_eq!((chunks.range(c, small.numel()).0 * 4) % 256, 0);
        }
        // GroupNorm(3) samples: the first group of a chunk is a sample's.
        let gn = View::group_norm(&[9, 6, 5, 7], 3);
        let chunks = Chunks::of_blocks(&gn, DType::F32, 4096, 32).unwrap();
        assert_eq!(chunks.elems, 4 * 210);
        assert_eq!(chunks.first_group(&gn, 2), 8 * 3);
        // No aligned run of rows fits: rows longer than a binding, or
        // fewer than the alignment asks for.
        assert_eq!(Chunks::of_blocks(&ln, DType::F32, 16 << 10, 256), None);
        assert_eq!(Chunks::of_blocks(&small, DType::F32, 31 * 280, 256), None);
    }

    #[test]
    fn a_split_row_norm_runs_its_row_kernel_once_per_chunk_of_whole_rows() {
        let view = View::layer_norm(&[1000, 1024], 1024);
        let ln = spec(view, StatsSource::Batch, false, DType::F32);
        // 128 rows of 4 KiB a chunk (whose statistics, 16 bytes a row,
        // start aligned too).
        let chunks = Chunks::of_blocks(&view, DType::F32, 128 << 12, 256).unwrap();
        assert_eq!(chunks.count, 8);
        let plan = plan_forward_chunked(&ln, &chunks, &SUBGROUPS);
        let whole = plan_forward_chunked(&ln, &Chunks::whole(view.numel()), &SUBGROUPS);
        assert_eq!(plan.len(), 8);
        for (c, d) in plan.iter().enumerate() {
            assert_eq!((d.kernel, d.chunk), (whole[0].kernel, c as u32));
        }
        // Workgroups for each chunk's rows, fewer than for all 1000.
        assert!(plan[0].workgroups < whole[0].workgroups);
        assert_eq!(forward_scratch_bytes(&ln, &chunks, &SUBGROUPS), 16 * 1000);
    }

    #[test]
    fn the_finalize_merges_as_many_partials_as_the_chosen_kernel_writes() {
        // Views where held columns and subgroup runs both apply (runs of at
        // least 128, at most 256 columns) and views where one does.
        for shape in [
            [2, 1, 128, 1],
            [2, 2, 128, 1],
            [23, 1, 144, 1],
            [2, 1, 512, 1],
            [2, 64, 128, 1],
            [8, 3, 4, 4],
        ] {
            let view = View::batch_norm(&shape, 1);
            let train = spec(view, StatsSource::Batch, true, DType::F32);
            let whole = Chunks::whole(view.numel());
            let partials = kernels_of(&train, &whole, &LAVAPIPE)[0];
            let tiles = tiles_for(&view, &whole, &LAVAPIPE);
            let want = match partials {
                Kernel::PartialsColumnsHeld | Kernel::PartialsColumns => tiles * view.b as u32,
                Kernel::PartialsRuns => view.a as u32,
                Kernel::PartialsEach => tiles * kernels::STATS_WG,
                _ => tiles,
            };
            assert_eq!(
                merge_tiles_for(&view, &whole, &LAVAPIPE),
                want,
                "{shape:?}: {partials:?}"
            );
        }
    }

    #[test]
    fn rows_longer_than_the_row_kernels_walk_take_the_partials() {
        // A lane of 8 walks a row's vectors twice: rows of 2^20 halves
        // passed lavapipe's 65,535 loop iterations per invocation.
        let long = View::layer_norm(&[64, 1 << 20], 1 << 20);
        let ln = spec(long, StatsSource::Batch, false, DType::F16);
        assert!(!uses_row_kernel(&ln));
        let kinds = kernels_of(&ln, &Chunks::whole(long.numel()), &LAVAPIPE);
        assert!(!kinds.contains(&Kernel::RowsSubgroup), "{kinds:?}");
        let shorter = View::layer_norm(&[64, 1 << 19], 1 << 19);
        assert!(uses_row_kernel(&spec(
            shorter,
            StatsSource::Batch,
            false,
            DType::F16
        )));
    }

    #[test]
    fn the_finalize_of_many_groups_per_channel_loops_least_per_invocation() {
        // 9000 instances of one partial: an invocation per group loops
        // 141 times 3, a tree per group 9000 times 10 (past lavapipe's
        // 65,535).
        assert!(finalize_by_groups(9000, 9000));
        // 2 instances of 65,536 partials: an invocation per group 131,073
        // times (past it), a tree per group 2 times 2056.
        assert!(!finalize_by_groups(2, 2 * 65_536));
        for (shape, kernel) in [
            ([9000, 2, 3], Kernel::FinalizeGroups),
            ([2, 1, 1 << 22], Kernel::Finalize),
        ] {
            let view = View::instance_norm(&shape);
            let tracked = spec(view, StatsSource::Batch, true, DType::F32);
            let kinds = kernels_of(&tracked, &Chunks::whole(view.numel()), &LAVAPIPE);
            assert_eq!(kinds[1], kernel, "{shape:?}: {kinds:?}");
        }
    }

    #[test]
    fn an_empty_batch_only_counts_itself() {
        let view = View::batch_norm(&[0, 4, 3, 3], 1);
        let train = spec(view, StatsSource::Batch, true, DType::F32);
        assert_eq!(
            kernels_of(&train, &Chunks::whole(0), &SUBGROUPS),
            [Kernel::BumpCounter]
        );
    }

    #[test]
    fn an_empty_batch_that_averages_nothing_writes_nan_for_every_channel_and_nothing_else() {
        // 300 channels: two workgroups of STATS_WG invocations.
        let empty = ForwardSpec {
            update: None,
            bump_counter: false,
            empty_batch_nan: true,
            zero_rstd: false,
            ..spec(
                View::instance_norm(&[0, 300, 5]),
                StatsSource::Batch,
                false,
                DType::F32,
            )
        };
        let plan = plan_forward_chunked(&empty, &Chunks::whole(0), &SUBGROUPS);
        assert_eq!(
            plan.iter()
                .map(|d| (d.kernel, d.workgroups))
                .collect::<Vec<_>>(),
            [(Kernel::RunningNan, 300u32.div_ceil(kernels::STATS_WG))]
        );
        let full = ForwardSpec {
            view: View::instance_norm(&[2, 300, 5]),
            ..empty
        };
        assert!(!kernels_of(&full, &Chunks::whole(3000), &SUBGROUPS).contains(&Kernel::RunningNan));
    }

    /// The shaders' fast_div, in Rust.
    fn fast_div(n: u32, f: [u32; 4]) -> u32 {
        let t = ((n as u64 * f[1] as u64) >> 32) as u32;
        (t + ((n - t) >> f[2])) >> f[3]
    }

    #[test]
    fn fast_division_is_exact() {
        let divisors = [
            1,
            2,
            3,
            4,
            5,
            7,
            8,
            64,
            100,
            3136,
            65535,
            65536,
            1 << 31,
            u32::MAX,
        ];
        let numerators = [
            0,
            1,
            2,
            3,
            99,
            100,
            12_845_056,
            1 << 31,
            u32::MAX - 1,
            u32::MAX,
        ];
        for &d in &divisors {
            let f = fast_divisor(d);
            for &n in &numerators {
                assert_eq!(fast_div(n, f), n / d, "{n} / {d}");
            }
            for n in (0..u32::MAX).step_by(9_973_751) {
                assert_eq!(fast_div(n, f), n / d, "{n} / {d}");
            }
        }
    }

    #[test]
    fn small_groups_of_a_split_tensor_keep_the_partials_of_two_chunks() {
        let caps = Caps::baseline();
        // 2,000,000 rows of 64 in 128 MiB bindings: 4 chunks, each row in
        // at most 2 of them. The scratch was one partial per chunk, 152 MB,
        // more than a binding; now 96 MB.
        let ln = View::layer_norm(&[2_000_000, 64], 64);
        let chunks = Chunks::new(ln.numel(), DType::F32, 128 << 20);
        assert_eq!(chunks.count, 4);
        assert_eq!(chunk_span(&ln, &chunks), 2);
        assert_eq!(merge_tiles_for(&ln, &chunks, &caps), 2);
        let bytes = scratch_bytes(&ln, &chunks, &caps);
        assert_eq!(bytes, 16 * 3 * 2_000_000);
        assert!(bytes <= 128 << 20);
        // Groups as long as a chunk reach two, one element longer three;
        // groups spanning the tensor (BatchNorm's channels) reach all of
        // them; one chunk is one.
        for (len, span) in [(chunks.elems, 2), (chunks.elems + 1, 3)] {
            let rows = View::layer_norm(&[64, len], len);
            let split = Chunks::new(rows.numel(), DType::F32, 128 << 20);
            assert_eq!(chunk_span(&rows, &split), span);
        }
        let bn = View::batch_norm(&[16, 64, 250, 300], 1);
        let bn_chunks = Chunks::new(bn.numel(), DType::F32, 128 << 20);
        assert_eq!(chunk_span(&bn, &bn_chunks), bn_chunks.count);
        assert_eq!(chunk_span(&ln, &Chunks::whole(ln.numel())), 1);
    }
}
