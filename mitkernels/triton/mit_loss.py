"""Triton kernels of the MiT loss family (MiT, TET, CCT-EAL) and their launchers.

The launchers implement the op contract of ``mitkernels/ops.py`` (its module docstring) with the
kernel schemas minus ``backend``; the math is ``docs/KERNEL_MATH.md``. One read of each logits row
in the forward pass (online max / sum / entropy / variance accumulators, s.2), one read and one write
in the backward pass (s.3), the temperature gradient from row statistics (s.4), and the state
update on the device without a host synchronisation.

Kernels (all launches are asynchronous; nothing reads a tensor value on the host):

* ``_rows_kernel``: per-row ``m, H, V, CE - H, log s`` and per-program partial sums (persistent
  programs, each walking row tiles in a fixed order, so the partial sums are bitwise
  reproducible); the class histogram by integer atomics (exact in any order) when there is one
  temperature.
* ``_summary_kernel``: sums the partials in a fixed order into the float64 summary; CCT-EAL's
  per-class sums for large C come from a scan of the targets (no float atomics).
* ``_finalize_kernel``: one program: state update, loss, stats, grad_info.
* ``_finalize_classes_kernel``: the same for MiT with many classes: the class walk spread over
  programs, the last one (by ticket) finishing. In ``loss_forward_`` (one temperature, rows
  wider than a block) it reads the rows kernel's partials itself: rows + this, no summary.
* ``_forward_kernel``: ``loss_forward_`` with one temperature and C <= 1024 in one launch: the rows
  of ``_rows_kernel``, then the program that finishes last sums the partials and finalizes.
* ``_fused_kernel``: ``_rows_kernel`` + summary + finalize in one program, for batches that fit.
* ``_none_loss_kernel``: the per-row loss of ``reduction='none'`` once ``c`` is known.
* ``_backward_kernel``: gradient of the logits; program 0 writes ``grad_tau`` for mean/sum.
* ``_grad_tau_none_kernel``: ``grad_tau`` for ``reduction='none'`` (weighted row-stat sums).

Every block size and warp count comes from the row tables (``row_table``, ``row_config``) or,
for NCHW logits of a few classes in ``_forward_kernel`` and ``_backward_kernel``, the pixel tiles
(``spatial_table``, ``spatial_config``); ``launch_variants`` lists every constexpr combination
the launchers can pick
(``tests/test_triton_aot.py`` compiles exactly that list for sm_80 and sm_90).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# Absolute: tests/test_triton_aot.py loads this file on its own, outside the package.
from mitkernels._backends import TRITON_MAX_ROWS
from mitkernels.triton import launch_plans as _plans
from mitkernels.triton import checks as _checks
from mitkernels.ops import (KIND_CCT, KIND_MIT, KIND_TET, LOGITS_DTYPES, ROW_STATS_FIELDS,
                            STATS_FIELDS, summary_size)
from mitkernels.ops import SUMMARY_HEADER as HEADER

SUMMARY_HEADER = tl.constexpr(HEADER)  # B, sum (CE - H), sum H, sum V, n_invalid
# finalize_'s kinds inside the kernels (a runtime argument, compared with these)
MIT, TET, CCT = tl.constexpr(KIND_MIT), tl.constexpr(KIND_TET), tl.constexpr(KIND_CCT)
STATS_LEN = len(STATS_FIELDS)
ROW_STATS = len(ROW_STATS_FIELDS)
NUM_STATS = tl.constexpr(STATS_LEN)
# Kernels decorated under TRITON_INTERPRET=1 run on numpy; one conversion needs a workaround there.
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
# tl.fdiv(..., approx=True) (div.approx.f32) is recent (Triton 3.9 has it, 3.6 not); older ones
# get the same seed through inline PTX.
FDIV_APPROX = tl.constexpr("approx" in inspect.signature(tl.fdiv).parameters)


# ------------------------------------------------------------------------------------------------
# Configurations: the one table the launchers and the AOT test read.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowConfig:
    """Tile of the row kernels: ``block_r`` rows x ``block_c`` columns, ``num_warps`` warps.

    ``local_classes``: one column block covers every class, so a program keeps the class histogram
    (and per-class sums) of its rows in registers; otherwise the summary kernel scans the targets.
    """

    max_classes: Optional[int]
    block_c: int
    block_r: int
    num_warps: int
    lanes: bool = False
    # The forward's grid: at most this many programs an SM walk the tiles (_program_cap).
    programs_per_sm: int = 8

    def __post_init__(self):
        if self.lanes and (self.block_r != 1 or self.local_classes):
            raise ValueError("the per-thread form is for wide rows, one row a tile")
        if self.programs_per_sm < 1:
            raise ValueError(f"programs_per_sm must be at least 1, got {self.programs_per_sm}")

    def lane_width(self, dtype: torch.dtype) -> int:
        """Wide rows with ``lanes``: the column block as a [block_c / L, L] tile, L the columns
        one pass of the program's threads loads 16 bytes each of, so that each thread's share
        of a block is its own (``_lane_row_stats``). 0: the row-block form
        (``_wide_row_stats``)."""
        if not self.lanes:
            return 0
        per_thread = 16 // dtype.itemsize
        return min(self.block_c, per_thread * 32 * self.num_warps)

    @property
    def local_classes(self) -> bool:
        return self.max_classes is not None and self.block_c >= self.max_classes


# First row whose max_classes >= C wins. Small C: a tile of rows a step, many steps a program;
# sizes chosen so that ptxas (sm_80, sm_90) spills nothing and stays near 128 registers
# (tests/test_triton_aot.py prints the table). Large C: one row a tile, the columns in a loop.
ROW_TABLE = (
    RowConfig(2, 2, 256, 4),
    RowConfig(4, 4, 128, 4),
    RowConfig(8, 8, 64, 4),
    RowConfig(16, 16, 32, 4),
    RowConfig(32, 32, 16, 4),
    RowConfig(64, 64, 8, 4),
    RowConfig(128, 128, 4, 4),
    RowConfig(256, 256, 4, 4),
    RowConfig(512, 512, 2, 4),
    RowConfig(1024, 1024, 1, 4),
    RowConfig(8192, 2048, 1, 4),
    # 16384 x 8 warps, per-thread accumulators (_lane_row_stats) for float32 logits. Earlier
    # sweeps (gpu-nvidia-h200-20261126-061500, -083606) had it level with the row-block form at
    # 8192 x 8 when the accumulators were a column's; with a thread's (this form), on an H200
    # (gpu-nvidia-h200-20261126-221800, sweep.csv) its forward at 8192 x 65536 reads at 102% of
    # the copy (0.497 ms; 8192 x 8 row-block 0.499, 2048 x 4 per-thread 0.498) and 81% at
    # 4096 x 32000 (0.154 ms; 2048 x 4 0.146, 8192 x 8 row-block 0.148).
    RowConfig(None, 16384, 1, 8, lanes=True),
)
# 16-bit logits: the same table but its large-C row, 4096 x 4 warps per-thread. In the same
# sweep its bf16 forward read at 74% of the copy at 8192 x 65536 (0.345 ms) and 56% at
# 4096 x 32000 (0.115 ms), against 52% / 33% at 16384 x 8 (0.484 / 0.194 ms, ptxas takes 254
# registers there: one program an SM) and 65% / 32% for the row-block 8192 x 8; 4096 x 8 warps
# 68% / 52%, 2048 x 4 61% / 29%. The commit before, with a column's accumulators at 16384 x 8,
# ran at 62% / 50% in that call (head_kernels2.log). Its backward is level (93%, 0.548 ms).
# Its forward's grid: 16 programs an SM, not 8. These 4-warp programs take 108-127 registers a
# thread (ptxas -v, tests/test_triton_aot.py's table; 4 resident an SM); with twice the
# programs each walks half as many rows, which should shorten the tail (why it is faster was
# not measured). On an H200 (gpu-nvidia-h200-20261127-073546, sweep.fwd.p*, bf16 forward, 8
# against 16 an SM): 8192 x 65536 0.342 -> 0.309 ms (74% -> 82% of the copy), 8192 x 32768
# 0.196 -> 0.177, 6144 x 65536 0.265 -> 0.240, 4096 x 32000 0.115 -> 0.108; 32 an SM was level
# with 16, 4 no faster than 8. Measured in bf16 on one H200 only (fp16 and sm_80 follow
# unmeasured). The float32 row (8 warps) keeps 8: level at 8192 x 65536 (0.4985 against 0.4991
# ms, run 072255); at 6144 x 65536 16 an SM ran 8% ahead of a default row that was out of line
# with that shape's other rows: to measure again.
ROW_TABLE_16 = ROW_TABLE[:-1] + (RowConfig(None, 4096, 1, 4, lanes=True, programs_per_sm=16),)
# float64 logits: half the rows (twice the registers per element).
ROW_TABLE_FP64 = (
    RowConfig(2, 2, 128, 4),
    RowConfig(4, 4, 64, 4),
    RowConfig(8, 8, 32, 4),
    RowConfig(16, 16, 16, 4),
    RowConfig(32, 32, 8, 4),
    RowConfig(64, 64, 4, 4),
    RowConfig(128, 128, 2, 4),
    RowConfig(256, 256, 2, 4),
    RowConfig(512, 512, 1, 4),
    RowConfig(1024, 1024, 1, 8),
    RowConfig(8192, 1024, 1, 8),
    RowConfig(None, 2048, 1, 8, lanes=True),
)
# NCHW logits of a few classes (a pixel's classes S apart, pixels at stride 1), for the forward
# of one temperature and the backward (_tile_rows' SPATIAL): tiles of neighbouring pixels of one
# sample, 16 bytes of pixels a thread and all of a pixel's classes in that thread (block_r =
# 16 / itemsize x 32 x num_warps). With the row table's tile (64 x 8 at 5 classes) the compiler
# put the 4 warps across the classes: the sm_90 SASS of the float32 forward's tile loop took
# 779 instructions a warp and 36 barriers for 64 pixels, 48.7 warp-instructions a pixel; at
# 512 x 8 it takes 1175 and 16 for 512 pixels, 9.2 a pixel (Triton 3.9; bf16 at 1024 x 8: 10.4,
# against 48.8). 109 registers (float32) and 189 (16-bit), no spill. float64 keeps the row
# table. The backward keeps a pixel's per-row constants (row max, log s, coefficients, target)
# for each of its pixels: at 1024 16-bit pixels a tile ptxas took up to 241 registers and
# spilled; it takes tiles of SPATIAL_BACKWARD_ROWS (45-128 registers), elementwise work with no
# row reduction.
# Up to 16 classes (segmentation's 9-16 organs or classes), by the sm_90 SASS (Triton 3.9, the
# cubins a launch builds): the float32 forward's tile loop at 512 x 16 takes 13.7
# warp-instructions a pixel and 18 barriers for 512 pixels, the row tile (32 x 16, warps across
# the classes) 98.0 and 26 for 32; 139 registers, no spill (S a multiple of 16; 185 registers
# otherwise; on sm_80 unaligned one value spilled, reloaded once a tile; under Triton 3.6,
# torch 2.11's, sm_90 aligned: 168 registers, 16 bytes spilled). The backward at 256 x 16
# (either dtype) 12-13 against 67-69 on the path a program runs, 121-137 registers. The 16-bit
# forward keeps the row tiles past 8 classes: 16 bytes of pixels a thread at 16 classes took 255
# registers and spilled (1024 pixels), or split the classes over two warps with 64 barriers a
# tile (512 pixels); SPATIAL_BACKWARD_TABLE_16 covers its backward. Not yet timed on a GPU
# (`gpu_kernels --sweep` times them against the row tiles: sweep.*.rowtiles).
SPATIAL_TABLE = (RowConfig(2, 2, 512, 4), RowConfig(4, 4, 512, 4), RowConfig(8, 8, 512, 4),
                 RowConfig(16, 16, 512, 4))
SPATIAL_TABLE_16 = (RowConfig(2, 2, 1024, 4), RowConfig(4, 4, 1024, 4), RowConfig(8, 8, 1024, 4))
SPATIAL_BACKWARD_ROWS = 256
SPATIAL_BACKWARD_TABLE_16 = SPATIAL_TABLE_16 + (RowConfig(16, 16, SPATIAL_BACKWARD_ROWS, 4),)
# Forward + finalize in one launch (one program) when the batch holds at most this many padded
# logits: C <= 8 up to 1024 rows, C = 2 up to 4096 rows.
FUSED_MAX_ELEMENTS = 8192
# Summary tiles: partials are 5 columns wide (the histogram goes by integer atomics) unless
# CCT-EAL's programs keep their per-class sums (5 + 3C), so the common case sums up to 8 * SMs
# partial rows of 5 columns: tall steps, few of them (each step waits on its loads). The target
# scan of CCT-EAL (C > 1024) keeps square tiles.
SUMMARY_TILE, SUMMARY_SCAN_TILE, SUMMARY_WARPS = (256, 8), (32, 32), 4
# The finalize walks the classes in one program, serially (TET, CCT-EAL, and MiT up to
# FINALIZE_BLOCK classes): wide steps keep the walk short. The fused kernel's walk shares the
# registers of its row tile and covers at most FUSED_MAX_ELEMENTS classes: its own, narrower
# step.
FINALIZE_BLOCK, FINALIZE_WARPS = 4096, 8
FUSED_BLOCK_K = 1024
# MiT's finalize spread over programs (_finalize_classes_kernel): in loss_forward_ with one
# temperature for every C > 1024, in finalize_ beyond FINALIZE_BLOCK classes. The classes in
# blocks, one program each; the last program's finalize steps BLOCK_K at 4 warps. Reading the
# rows kernel's partials itself (FROM_PARTS), each program sums them CLASS_BLOCK_P rows a step.
CLASS_BLOCK, CLASS_BLOCK_K, CLASS_WARPS, CLASS_BLOCK_P = 1024, 1024, 4, 256
# [ticket, 3 unused, hist[C]] in one zeroed int32 buffer: the histogram starts 16 bytes in, so
# the kernels reading it see a 16-byte aligned pointer (as the AOT test compiles them).
IBUF_HIST = 4
HIST_OFFSET = tl.constexpr(IBUF_HIST)
# The last program of _forward_kernel: partial rows a step, and classes a step in its finalize
# (smaller than FINALIZE_BLOCK: the finalize shares the registers of the streaming loop's kernel).
FORWARD_BLOCK_P, FORWARD_BLOCK_K = 64, 256
NONE_LOSS_BLOCK, NONE_LOSS_WARPS = 1024, 4
GRAD_TAU_BLOCK_K, GRAD_TAU_BLOCK_N, GRAD_TAU_WARPS = 32, 128, 4


def row_table(dtype: torch.dtype) -> Tuple[RowConfig, ...]:
    if dtype == torch.float64:
        return ROW_TABLE_FP64
    return ROW_TABLE_16 if dtype.itemsize == 2 else ROW_TABLE


def spatial_table(dtype: torch.dtype, backward: bool = False) -> Tuple[RowConfig, ...]:
    """The SPATIAL tiles of the forward (or of the backward, which replaces block_r with
    SPATIAL_BACKWARD_ROWS) for logits of ``dtype``."""
    if dtype == torch.float64:
        return ()
    if dtype.itemsize == 2:
        return SPATIAL_BACKWARD_TABLE_16 if backward else SPATIAL_TABLE_16
    return SPATIAL_TABLE


def row_config(num_classes: int, dtype: torch.dtype) -> RowConfig:
    table = row_table(dtype)
    for cfg in table:
        if cfg.max_classes is None or num_classes <= cfg.max_classes:
            return cfg
    raise AssertionError("ROW_TABLE ends with an unbounded row")


def spatial_config(logits: Tensor, backward: bool = False) -> Optional[RowConfig]:
    """The tile of ``spatial_table`` (the backward's: SPATIAL_BACKWARD_ROWS pixels, from its own
    table, where 16-bit logits of 9-16 classes have a tile) for ``[N, C, S]`` logits whose
    pixels lie at stride 1 and classes apart (NCHW), when one covers C and a
    sample's pixels fill at least half a tile (a tile never spans two samples: 7 x 7 pixels would
    leave 90% of a 512-pixel tile masked); None for every other layout and for an empty batch
    (the row table's tiles)."""
    n, c, s = logits.shape
    if n == 0 or s < 2 or logits.stride(2) != 1 or logits.stride(1) == 1:
        return None
    for cfg in spatial_table(logits.dtype, backward):
        if c <= cfg.max_classes:
            tile = spatial_backward(cfg) if backward else cfg
            return tile if 2 * s >= tile.block_r else None
    return None


def spatial_backward(cfg: RowConfig) -> RowConfig:
    return dataclasses.replace(cfg, block_r=SPATIAL_BACKWARD_ROWS)


def rows_constexprs(cfg: RowConfig, per_class: bool, dtype: torch.dtype) -> dict:
    return dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, BLOCK_L=cfg.lane_width(dtype),
                LOCAL_CLASSES=cfg.local_classes, PER_CLASS=per_class)


def atomic_hist(per_class: bool) -> bool:
    """One temperature: the rows kernel counts the class histogram with integer atomics. The
    per-class float sums of CCT-EAL stay in the partials (or are scanned), for determinism."""
    return not per_class


def summary_constexprs(cfg: RowConfig, per_class: bool) -> dict:
    scan = not cfg.local_classes and per_class
    block_n, block_w = SUMMARY_SCAN_TILE if scan else SUMMARY_TILE
    return dict(SCAN=scan, HIST=atomic_hist(per_class), BLOCK_N=block_n, BLOCK_W=block_w)


def forward_constexprs(cfg: RowConfig, spatial: bool = False) -> dict:
    """_forward_kernel's tile; only configurations with ``cfg.local_classes`` launch it."""
    return dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, BLOCK_K=FORWARD_BLOCK_K,
                BLOCK_P=FORWARD_BLOCK_P, SPATIAL=spatial)


def backward_constexprs(cfg: RowConfig, per_class: bool, spatial: bool = False) -> dict:
    return dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, PER_CLASS=per_class, SPATIAL=spatial)


def classes_constexprs(from_parts: bool) -> dict:
    return dict(BLOCK_K=CLASS_BLOCK_K, CLASS_BLOCK=CLASS_BLOCK, FROM_PARTS=from_parts,
                BLOCK_P=CLASS_BLOCK_P)


def launch_variants() -> Iterator[Tuple[str, torch.dtype, dict, int]]:
    """Every ``(kernel name, logits dtype, constexprs, num_warps)`` a launcher can launch."""
    for dtype in LOGITS_DTYPES:
        for cfg in row_table(dtype):
            for per_class in (False, True):
                ce = rows_constexprs(cfg, per_class, dtype)
                yield ("_rows_kernel", dtype, dict(ce, ATOMIC_HIST=atomic_hist(per_class)),
                       cfg.num_warps)
                yield "_summary_kernel", dtype, summary_constexprs(cfg, per_class), SUMMARY_WARPS
                if cfg.local_classes:
                    yield "_fused_kernel", dtype, dict(ce, BLOCK_K=FUSED_BLOCK_K), cfg.num_warps
            if cfg.local_classes:
                yield "_forward_kernel", dtype, forward_constexprs(cfg), cfg.num_warps
            for per_class in (False, True):
                yield "_backward_kernel", dtype, backward_constexprs(cfg, per_class), cfg.num_warps
        for cfg in spatial_table(dtype):
            yield "_forward_kernel", dtype, forward_constexprs(cfg, True), cfg.num_warps
        for cfg in spatial_table(dtype, backward=True):
            bwd = spatial_backward(cfg)
            for per_class in (False, True):
                yield ("_backward_kernel", dtype, backward_constexprs(bwd, per_class, True),
                       bwd.num_warps)
        yield "_finalize_kernel", dtype, dict(BLOCK_K=FINALIZE_BLOCK), FINALIZE_WARPS
        for from_parts in (False, True):
            yield ("_finalize_classes_kernel", dtype, classes_constexprs(from_parts),
                   CLASS_WARPS)
        yield "_none_loss_kernel", dtype, dict(BLOCK=NONE_LOSS_BLOCK), NONE_LOSS_WARPS
        yield "_grad_tau_none_kernel", dtype, dict(BLOCK_N=GRAD_TAU_BLOCK_N,
                                                   BLOCK_K=GRAD_TAU_BLOCK_K), GRAD_TAU_WARPS


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _nan_f64():
    # A quiet NaN from its bits: no 0/0 (which the interpreter warns about).
    return tl.full((), 0x7FF8000000000000, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _f64(x):
    # A float64 scalar from a float64 argument; under the interpreter the argument is a Python
    # float that tl.cast would round through float32 first.
    return tl.zeros([], tl.float64) + x


@triton.jit
def _saturated(v, dtype: tl.constexpr):
    """float64 ``v`` in a state scalar's dtype: an integer dtype saturated at its range and NaN
    as 0 (csrc/mit_loss_math.h's saturating_cast), where a conversion would wrap (the
    interpreter) or depend on the hardware."""
    if dtype == tl.int32:
        v = tl.where(v != v, 0.0, tl.where(v > 2147483647.0, 2147483647.0,
                                           tl.where(v < -2147483648.0, -2147483648.0, v)))
        return v.to(tl.int32)
    elif dtype == tl.int64:
        big = v >= 9223372036854775808.0  # 2^63
        small = v < -9223372036854775808.0
        out = tl.where(big | small | (v != v), 0.0, v).to(tl.int64)
        out = tl.where(big, 9223372036854775807, out)
        return tl.where(small, -9223372036854775807 - 1, out)
    else:
        return v.to(dtype)


@triton.jit
def _load_count(ptr):
    """A count (dual_updates) as int64: exact from an integer tensor, saturated from a float."""
    v = tl.load(ptr)
    if ptr.dtype.element_ty.is_int():
        return v.to(tl.int64)
    return _saturated(v.to(tl.float64), tl.int64)


@triton.jit
def _store_count(ptr, n, mask):
    """int64 ``n`` into a count of any dtype the op takes, saturated for int32."""
    dtype: tl.constexpr = ptr.dtype.element_ty
    if dtype == tl.int32:
        n = tl.where(n > 2147483647, 2147483647, n)
    tl.store(ptr, n.to(dtype), mask=mask)


@triton.jit
def _to_dtype(x, dtype: tl.constexpr):
    """x in an output dtype, rounded to nearest even; 16-bit outputs go through float32."""
    if dtype == tl.bfloat16:
        if INTERPRETED:
            # The interpreter truncates float32 -> bfloat16 (rtne included): round by hand.
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(tl.float32).to(tl.bfloat16)
    if dtype == tl.float16:
        return x.to(tl.float32).to(tl.float16)
    return x.to(dtype)


@triton.jit
def _widen(x, ACC: tl.constexpr):
    """Logits in the accumulation dtype. bfloat16 by its bits (a bfloat16 is the top half of a
    float32): ptxas makes cvt.f32.bf16 of a register's upper half two instructions, the shift or
    mask here one."""
    if x.dtype == tl.bfloat16 and not INTERPRETED:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(ACC)
    else:
        return x.to(ACC)


@triton.jit
def _recip(x):
    """1/x without an IEEE division.

    ptxas turns div.rn (float32 and float64) into a slow-path subroutine call and spills registers
    around it; div.approx.f32 (2 ulp, |x| in [2^-126, 2^126]) seeds Newton steps instead: one for
    float32, two for float64 (to about 1 ulp). Every divisor here lies far inside that range.
    """
    if INTERPRETED:
        r = (1.0 / x.to(tl.float32)).to(x.dtype)
    elif FDIV_APPROX:
        r = tl.fdiv(1.0, x.to(tl.float32), approx=True).to(x.dtype)
    else:  # Triton before 3.7 has no approx division: the same seed through inline PTX
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x.to(tl.float32)],
                                      dtype=tl.float32, is_pure=True, pack=1).to(x.dtype)
    r = r * (2.0 - x * r)
    if x.dtype == tl.float64:
        r = r * (2.0 - x * r)
    return r


@triton.jit
def _temperature(tau, t_eps, t_min, t_max):
    """T = clamp(softplus(tau) + t_eps, t_min, t_max) in tau's dtype, and dT/dtau.

    torch's softplus, term for term (threshold 20): tau above it, else log1p(exp(tau)), with
    log1p(e) = log(u) * e / (u - 1), u = 1 + e, exact to rounding (Goldberg; no libdevice, so the
    interpreter runs it too). dT/dtau = sigmoid(tau) (1 above the threshold), 0 outside
    torch.clamp's inclusive range.
    """
    e = tl.exp(tl.minimum(tau, 20.0))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e * _recip(u - 1.0)))
    softplus = tl.where(tau > 20.0, tau, log1p_e)
    t_raw = softplus + _f64(t_eps).to(tau.dtype)
    lo = _f64(t_min).to(tau.dtype)
    hi = _f64(t_max).to(tau.dtype)
    temp = tl.minimum(tl.maximum(t_raw, lo), hi)
    # torch.clamp keeps a NaN; tl.minimum / tl.maximum (and the exp's tl.minimum above) drop it,
    # on a GPU and in the interpreter alike (np.fmin / np.fmax), which would turn a NaN tau into
    # a finite T and loss.
    temp = tl.where(tau != tau, tau, temp)
    dtemp = tl.where(tau > 20.0, 1.0, e * _recip(u))
    # 0 outside the range; a NaN tau's stays NaN (its t_raw, which the exp's minimum made
    # finite, lies inside), as the reference's autograd gives: softplus' backward, 0 * NaN
    dtemp = tl.where((t_raw >= lo) & (t_raw <= hi), dtemp, 0.0)
    dtemp = tl.where(tau != tau, tau, dtemp)
    return temp, dtemp


@triton.jit
def _targets_in(tg_ptr, rows, in_range, C, ignore_index):
    y = tl.load(tg_ptr + rows, mask=in_range, other=0)
    counted = in_range & (y != ignore_index)
    valid = counted & (y >= 0) & (y < C)
    invalid = counted & (~valid)
    # A target that is not valid never becomes an index: class 0 stands in (masked everywhere).
    y_safe = tl.where(valid, y, 0)
    return y_safe, valid, invalid


@triton.jit
def _row_targets(tg_ptr, rows, R, C, ignore_index):
    in_range = rows < R
    y_safe, valid, invalid = _targets_in(tg_ptr, rows, in_range, C, ignore_index)
    return y_safe, valid, invalid, in_range


@triton.jit
def _row_temperature(tau_ptr, y_safe, t_eps, t_min, t_max, ACC: tl.constexpr,
                     PER_CLASS: tl.constexpr):
    if PER_CLASS:
        tau = tl.load(tau_ptr + y_safe)
    else:
        tau = tl.load(tau_ptr + y_safe * 0)
    temp, dtemp = _temperature(tau, t_eps, t_min, t_max)
    return temp.to(ACC)


@triton.jit
def _bases(n, pix, stride_n, stride_s):
    # int64 element offsets: tensors beyond 2^31 elements are fine.
    return n.to(tl.int64) * stride_n + pix.to(tl.int64) * stride_s


@triton.jit
def _sample_pixel(rows, S):
    """Row = n S + pixel: (n, pixel). rows < 2^31: the division stays 32-bit (a 64-bit one is a
    subroutine call)."""
    n = rows // S
    return n, rows - n * S


@triton.jit
def _row_bases(rows, S, stride_n, stride_s):
    n, pix = _sample_pixel(rows, S)
    return _bases(n, pix, stride_n, stride_s)


@triton.jit
def _num_tiles(R, S, BLOCK_R: tl.constexpr, SPATIAL: tl.constexpr):
    if SPATIAL:
        return (R // S) * tl.cdiv(S, BLOCK_R)
    return tl.cdiv(R, BLOCK_R)


@triton.jit
def _tile_rows(tile, R, S, BLOCK_R: tl.constexpr, SPATIAL: tl.constexpr):
    """The rows of a tile: (row indices, in range, sample n, pixel), row = n S + pixel.

    SPATIAL (NCHW logits, a pixel's classes S apart, pixels at stride 1): a tile is BLOCK_R
    neighbouring pixels of one sample, ``cdiv(S, BLOCK_R)`` tiles a sample. The compiler then
    sees the tile's pixels contiguous whatever S, puts the threads along them and each pixel's
    classes inside one thread: a row's sums need no exchange between threads (row_config's
    SPATIAL_TABLE has the sizes). Else BLOCK_R consecutive rows, sample and pixel by division.
    """
    if SPATIAL:
        per_sample = tl.cdiv(S, BLOCK_R)
        n = tile // per_sample
        pix = (tile - n * per_sample) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_range = pix < S
        rows = n * S + pix
    else:
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        in_range = rows < R
        n, pix = _sample_pixel(rows, S)
    return rows, in_range, n, pix


@triton.jit
def _ln2(ACC: tl.constexpr):
    """ln 2 in ACC, computed: Triton makes a Python float literal a float32 constant."""
    return tl.log(tl.full([], 2.0, ACC))


@triton.jit
def _clamp_shift(d):
    """d floored at -1e4 (csrc's kMinShift), where exp(d) and exp2(d) are 0 anyway.

    -inf logits (padding, masked classes) then give e d = e d^2 = 0 instead of 0 * inf, in one
    max that keeps NaN (a NaN logit still poisons its row)."""
    return tl.maximum(d, -1.0e4, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _exp2_terms(x, shift, inv_temp2):
    """e = 2^w and w = (x - shift) inv_temp2 (floored by _clamp_shift), in the base-2 units of
    the row statistics; shift (the running max) in logit units. The difference first: exact near
    the max, so the logit at the max gives w = 0 and e = 1 whatever |x / T| (csrc's log_prob has
    the reason). exp2 of a base-2 argument spares the multiply by log2(e) inside exp: one
    instruction less an element, in kernels that are instruction-bound for 16-bit logits.
    """
    w = _clamp_shift((x - shift) * inv_temp2)
    return tl.exp2(w), w


@triton.jit
def _block_stats(x_ptr, base, in_range, inv_temp2, C, stride_c, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """(m, s, A, Q) of rows that fit one column block: one load, row reductions. m is the row's
    max logit; s, A, Q are in base-2 units (here and in the other forms)."""
    cols = tl.arange(0, BLOCK_C)
    mask = in_range[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + (base[:, None] + cols.to(tl.int64)[None, :] * stride_c), mask=mask,
                other=float("-inf"))
    xa = _widen(x, ACC)
    m = tl.max(xa, axis=1)
    shift = tl.where(m == float("-inf"), 0.0, m)
    e, w = _exp2_terms(xa, shift[:, None], inv_temp2[:, None])
    return m, tl.sum(e, axis=1), tl.sum(e * w, axis=1), tl.sum(e * w * w, axis=1)


@triton.jit
def _move_reference(old, new, inv_temp2, s, a, q):
    """Accumulators relative to the max ``old`` made relative to ``new`` >= old (logit units;
    KERNEL_MATH s.2), in the base-2 units of the row statistics: d = (old - new) inv_temp2 <= 0,
    f = 2^d: s' = f s, A' = f (A + d s), Q' = f (Q + 2 d A + d^2 s) (the algebra holds in any
    base whose exponential weighs e)."""
    d = (old - new) * inv_temp2
    f = tl.exp2(d)
    # f = 0 (old far below new, e.g. a span of logits masked with -1e30): 0, not 0 * inf from d^2
    return f * s, tl.where(f > 0.0, f * (a + d * s), 0.0), tl.where(
        f > 0.0, f * (q + 2.0 * d * a + d * d * s), 0.0)


@triton.jit
def _fold(x, AXIS: tl.constexpr, MAX: tl.constexpr):
    """x summed (MAX: maxed) along AXIS; AXIS = -1: a [U, NT, V] tile's axes 0 and 2, the ones
    inside a thread."""
    if AXIS == -1:
        return _fold(_fold(x, 2, MAX), 0, MAX)
    elif MAX:
        return tl.max(x, axis=AXIS)
    else:
        return tl.sum(x, axis=AXIS)


@triton.jit
def _unfold(v, AXIS: tl.constexpr):
    """v (reduced along AXIS, as _fold) broadcastable against the tile again."""
    if AXIS == -1:
        return v[None, :, None]
    else:
        return tl.expand_dims(v, AXIS)


@triton.jit
def _online_step(m, s, a, q, x, inv_temp2, AXIS: tl.constexpr):
    """The running (m, s, A, Q) along AXIS of the logits x fed one more block (KERNEL_MATH s.2,
    base 2): the block's max first, the sums moved to the new max, then the block's terms added.
    inv_temp2 broadcasts against m (a row's or a thread's scalars)."""
    m_new = tl.maximum(m, _fold(x, AXIS, True))
    # No finite logit yet: m stays -inf and the shift is 0 (s = A = Q = 0).
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s, a, q = _move_reference(tl.where(m == float("-inf"), shift, m), shift, inv_temp2, s, a, q)
    e, w = _exp2_terms(x, _unfold(shift, AXIS), _unfold(inv_temp2, AXIS))
    return (m_new, s + _fold(e, AXIS, False), a + _fold(e * w, AXIS, False),
            q + _fold(e * w * w, AXIS, False))


@triton.jit
def _wide_row_stats(x_ptr, base, in_range, inv_temp2, C, stride_c, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """(m, s, A, Q) of rows wider than a column block, online over the blocks:
    each block's max first, then its s, A, Q relative to the running max (KERNEL_MATH s.2).

    (Measured on an H200 against a variant that reduces a block once against the previous max and
    keeps the next block's load in flight: no faster, so the simpler form stays;
    benchmarks/results/gpu-nvidia-h200-20261126-034852/kernels.csv, rows sweep.fwd.a0/a1.)
    """
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    a = tl.zeros([BLOCK_R], ACC)
    q = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = in_range[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + (base[:, None] + cols.to(tl.int64)[None, :] * stride_c),
                    mask=mask, other=float("-inf"))
        m, s, a, q = _online_step(m, s, a, q, _widen(x, ACC), inv_temp2, 1)
    return m, s, a, q


@triton.jit
def _lane_row_stats(x_ptr, row, S, stride_n, stride_s, inv_temp2, C, stride_c,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                    ACC: tl.constexpr):
    """(m, s, A, Q) of one row (BLOCK_R = 1) wider than a column block, with no reduction
    across threads inside the loop: each thread keeps its own online accumulators. A block is a
    [BLOCK_C / BLOCK_L, NT, V] tile, NT the program's threads and V the logits in 16 bytes
    (RowConfig.lane_width: BLOCK_L = NT V), so that axes 0 and 2 lie inside each thread: it
    loads 16 bytes a row of the tile, and its accumulators are moved to a new max once a block.
    The threads are merged once, at the end of the row (KERNEL_MATH s.2).

    Why: the row-block form (``_wide_row_stats``) reduces across all warps four times a block.
    Accumulators a column of the tile (the form before this one) paid a rescale every
    BLOCK_C / BLOCK_L logits, about 2 of the 14 instructions an element of the bf16 loop on
    sm_90. Full blocks are read without a mask; the partial block last.
    """
    tl.static_assert(BLOCK_R == 1, "the per-thread form reads one row a tile")
    BLOCK_V: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    BLOCK_T: tl.constexpr = BLOCK_L // BLOCK_V
    BLOCK_U: tl.constexpr = BLOCK_C // BLOCK_L
    tl.static_assert(BLOCK_L % BLOCK_V == 0 and BLOCK_C % BLOCK_L == 0,
                     "a block is whole rows of 16 bytes a thread (RowConfig.lane_width)")
    # BLOCK_R = 1: the row's scalars (row < R: the callers walk tiles below cdiv(R, 1)). The
    # base from the row index, not from the caller's [1] tensor, so that the compiler still sees
    # the stride's alignment and vectorizes the loads.
    row_base = _row_bases(row, S, stride_n, stride_s)
    it = tl.sum(inv_temp2, axis=0)
    it_t = tl.zeros([BLOCK_T], ACC) + it  # the threads' copy (a splat): _online_step broadcasts it
    # Loaded as a [BLOCK_U, BLOCK_L] tile (the threads along the columns, V each), then
    # reshaped: a tile loaded in 3-d may get its threads along axis 0 (the compiler's choice).
    offs = tl.arange(0, BLOCK_U)[:, None] * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    m = tl.full([BLOCK_T], float("-inf"), ACC)
    s = tl.zeros([BLOCK_T], ACC)
    a = tl.zeros([BLOCK_T], ACC)
    q = tl.zeros([BLOCK_T], ACC)
    c_full = C - C % BLOCK_C
    for c0 in range(0, c_full, BLOCK_C):
        x = tl.load(x_ptr + (row_base + (c0 + offs).to(tl.int64) * stride_c))
        x = tl.reshape(_widen(x, ACC), [BLOCK_U, BLOCK_T, BLOCK_V])
        m, s, a, q = _online_step(m, s, a, q, x, it_t, -1)
    if c_full < C:
        cols = c_full + offs
        x = tl.load(x_ptr + (row_base + cols.to(tl.int64) * stride_c), mask=cols < C,
                    other=float("-inf"))
        x = tl.reshape(_widen(x, ACC), [BLOCK_U, BLOCK_T, BLOCK_V])
        m, s, a, q = _online_step(m, s, a, q, x, it_t, -1)
    m_row = tl.max(m, axis=0)
    shift = tl.where(m_row == float("-inf"), 0.0, m_row)
    s, a, q = _move_reference(tl.where(m == float("-inf"), shift, m), shift, it, s, a, q)
    one = tl.zeros([BLOCK_R], ACC)
    return one + m_row, one + tl.sum(s, axis=0), one + tl.sum(a, axis=0), one + tl.sum(q, axis=0)


@triton.jit
def _tile_stats(x_ptr, tg_ptr, tau_ptr, rs_ptr, hist_ptr, tile, R, C, S, stride_n, stride_c,
                stride_s, ignore_index, t_eps, t_min, t_max,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                LOCAL_CLASSES: tl.constexpr, PER_CLASS: tl.constexpr, ATOMIC_HIST: tl.constexpr,
                SPATIAL: tl.constexpr):
    """Row statistics of one tile of rows (KERNEL_MATH s.2), stored in ``rs``; tile sums returned.

    ATOMIC_HIST without LOCAL_CLASSES: the valid rows are counted per class into the int32
    ``hist_ptr`` here, one integer atomic a row (exact in any order).
    """
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows, in_range, n, pix = _tile_rows(tile, R, S, BLOCK_R, SPATIAL)
    y_safe, valid, invalid = _targets_in(tg_ptr, rows, in_range, C, ignore_index)
    temp = _row_temperature(tau_ptr, y_safe, t_eps, t_min, t_max, ACC, PER_CLASS)
    inv_temp = _recip(temp)
    base = _bases(n, pix, stride_n, stride_s)

    # The statistics in base 2 (z / ln 2: exp2 per element, _exp2_terms), back to base e below.
    ln2 = _ln2(ACC)
    inv_temp2 = inv_temp * _recip(ln2)
    # Rows that fit one block take the one-pass form: the online loop run once leaves ptxas
    # spilling in the multi-row tiles (bf16 C = 64..512 on sm_80/sm_90, tests/test_triton_aot.py).
    if LOCAL_CLASSES:
        m, s, a2, q2 = _block_stats(x_ptr, base, in_range, inv_temp2, C, stride_c, BLOCK_R,
                                    BLOCK_C, ACC)
    elif BLOCK_L > 0:
        m, s, a2, q2 = _lane_row_stats(x_ptr, tile, S, stride_n, stride_s, inv_temp2, C,
                                       stride_c, BLOCK_R, BLOCK_C, BLOCK_L, ACC)
    else:
        m, s, a2, q2 = _wide_row_stats(x_ptr, base, in_range, inv_temp2, C, stride_c, BLOCK_R,
                                       BLOCK_C, ACC)
    a = a2 * ln2
    q = q2 * (ln2 * ln2)

    s = tl.where(in_range, s, 1.0)  # padding rows: no log(0) (never stored)
    log_s = tl.log(s)
    inv_s = _recip(s)
    mean_w = a * inv_s
    ent = tl.where(valid, log_s - mean_w, 0.0)  # H = lse - E_p[z]
    # rounding can leave a tiny negative; a NaN stays NaN, as the C++ kernels' max0 keeps it
    # (tl.maximum's default drops it on a GPU; max.NaN is one instruction, as max is)
    var = tl.where(valid, tl.maximum(q * inv_s - mean_w * mean_w, 0.0,
                                     propagate_nan=tl.PropagateNan.ALL), 0.0)
    # The target's logit, gathered (one element a row) rather than picked out of every block;
    # after the row loop, so that it is not live across it.
    x_y = tl.load(x_ptr + (base + y_safe.to(tl.int64) * stride_c), mask=valid, other=0.0)
    # CE - H = E_p[z] - z_y = (m - x_y) / T + A / s, formed directly (csrc's row_finish): from
    # rounded CE and H it lost its digits when both sit near log C (small logits).
    ceh = tl.where(valid, (m - _widen(x_y, ACC)) * inv_temp + mean_w, 0.0)
    # Rows m, H, V, CE - H, log s (ops.ROW_STATS_FIELDS); the backward takes log p from m, log s.
    rows64 = rows.to(tl.int64)
    tl.store(rs_ptr + rows64, tl.where(valid, m, 0.0), mask=in_range)
    tl.store(rs_ptr + R + rows64, ent, mask=in_range)
    tl.store(rs_ptr + R + R + rows64, var, mask=in_range)
    tl.store(rs_ptr + R + R + R + rows64, ceh, mask=in_range)
    tl.store(rs_ptr + R + R + R + R + rows64, tl.where(valid, log_s, 0.0), mask=in_range)

    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    n_invalid = tl.sum(invalid.to(tl.int32), axis=0)
    sum_ceh = tl.sum(ceh, axis=0)
    sum_h = tl.sum(ent, axis=0)
    sum_v = tl.sum(var, axis=0)
    if LOCAL_CLASSES:
        classes = tl.arange(0, BLOCK_C)
        in_class = valid[:, None] & (y_safe[:, None] == classes[None, :])
        hist = tl.sum(in_class.to(tl.int32), axis=0)
        if PER_CLASS:
            class_ceh = tl.sum(tl.where(in_class, ceh[:, None], 0.0), axis=0)
            class_v = tl.sum(tl.where(in_class, var[:, None], 0.0), axis=0)
        else:
            class_ceh = tl.zeros([BLOCK_C], ACC)
            class_v = tl.zeros([BLOCK_C], ACC)
    else:
        if ATOMIC_HIST:
            tl.atomic_add(hist_ptr + y_safe, tl.full([BLOCK_R], 1, tl.int32), mask=valid,
                          sem="relaxed")
        hist = tl.zeros([BLOCK_C], tl.int32)
        class_ceh = tl.zeros([BLOCK_C], ACC)
        class_v = tl.zeros([BLOCK_C], ACC)
    return n_valid, n_invalid, sum_ceh, sum_h, sum_v, hist, class_ceh, class_v


@triton.jit
def _rows_body(x_ptr, tg_ptr, tau_ptr, rs_ptr, part_ptr, hist_ptr, pid, nprog, R, C, S,
               stride_n, stride_c, stride_s, ignore_index, t_eps, t_min, t_max,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
               LOCAL_CLASSES: tl.constexpr, PER_CLASS: tl.constexpr, ATOMIC_HIST: tl.constexpr,
               SPATIAL: tl.constexpr):
    """Tiles pid, pid + nprog, ... in order; the program's sums go to ``part_ptr`` (float64).

    Layout of a partial row: ``[B, sum (CE - H), sum H, sum V, n_invalid]``, then with LOCAL_CLASSES
    and not ATOMIC_HIST ``hist[C]`` (+ ``sum_{y=k}(CE - H)[C], sum_{y=k} V[C]`` with PER_CLASS):
    the summary layout. ATOMIC_HIST counts the classes into the int32 ``hist_ptr`` instead (with
    LOCAL_CLASSES one atomic per class a program, else one a row): integer sums are exact in any
    order, and the partials stay five numbers wide.
    """
    num_tiles = _num_tiles(R, S, BLOCK_R, SPATIAL)
    acc_b = tl.zeros([], tl.float64)
    acc_inv = tl.zeros([], tl.float64)
    acc_d = tl.zeros([], tl.float64)  # sum (CE - H)
    acc_h = tl.zeros([], tl.float64)
    acc_v = tl.zeros([], tl.float64)
    acc_hist = tl.zeros([BLOCK_C], tl.float64)
    acc_ceh = tl.zeros([BLOCK_C], tl.float64)
    acc_cv = tl.zeros([BLOCK_C], tl.float64)
    for tile in range(pid, num_tiles, nprog):
        b, inv, d, h, v, hist, ceh, cv = _tile_stats(
            x_ptr, tg_ptr, tau_ptr, rs_ptr, hist_ptr, tile, R, C, S, stride_n, stride_c, stride_s,
            ignore_index, t_eps, t_min, t_max, BLOCK_R, BLOCK_C, BLOCK_L, LOCAL_CLASSES,
            PER_CLASS, ATOMIC_HIST, SPATIAL)
        acc_b += b.to(tl.float64)
        acc_inv += inv.to(tl.float64)
        acc_d += d.to(tl.float64)
        acc_h += h.to(tl.float64)
        acc_v += v.to(tl.float64)
        if LOCAL_CLASSES:
            acc_hist += hist.to(tl.float64)
            if PER_CLASS:
                acc_ceh += ceh.to(tl.float64)
                acc_cv += cv.to(tl.float64)
    width = SUMMARY_HEADER
    if LOCAL_CLASSES and not ATOMIC_HIST:
        if PER_CLASS:
            width += 3 * C
        else:
            width += C
    out = part_ptr + pid * width
    idx = tl.arange(0, 8)
    header = tl.where(idx == 0, acc_b, tl.where(idx == 1, acc_d, tl.where(
        idx == 2, acc_h, tl.where(idx == 3, acc_v, acc_inv))))
    tl.store(out + idx, header, mask=idx < SUMMARY_HEADER)
    if LOCAL_CLASSES and ATOMIC_HIST:
        classes = tl.arange(0, BLOCK_C)
        tl.atomic_add(hist_ptr + classes, acc_hist.to(tl.int32),
                      mask=(classes < C) & (acc_hist > 0.0), sem="relaxed")
    if LOCAL_CLASSES and not ATOMIC_HIST:
        classes = tl.arange(0, BLOCK_C)
        cmask = classes < C
        tl.store(out + SUMMARY_HEADER + classes, acc_hist, mask=cmask)
        if PER_CLASS:
            tl.store(out + SUMMARY_HEADER + C + classes, acc_ceh, mask=cmask)
            tl.store(out + SUMMARY_HEADER + C + C + classes, acc_cv, mask=cmask)


@triton.jit
def _rows_kernel(x_ptr, tg_ptr, tau_ptr, rs_ptr, part_ptr, hist_ptr, R, C, S, stride_n, stride_c,
                 stride_s, ignore_index, t_eps: tl.float64, t_min: tl.float64, t_max: tl.float64,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                 LOCAL_CLASSES: tl.constexpr, PER_CLASS: tl.constexpr, ATOMIC_HIST: tl.constexpr):
    _rows_body(x_ptr, tg_ptr, tau_ptr, rs_ptr, part_ptr, hist_ptr, tl.program_id(0),
               tl.num_programs(0), R, C, S, stride_n, stride_c, stride_s, ignore_index, t_eps,
               t_min, t_max, BLOCK_R, BLOCK_C, BLOCK_L, LOCAL_CLASSES, PER_CLASS, ATOMIC_HIST,
               False)


@triton.jit
def _summary_kernel(part_ptr, P, WP, rs_ptr, tg_ptr, hist_ptr, sum_ptr, R, C, W, ignore_index,
                    SCAN: tl.constexpr, HIST: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_W: tl.constexpr):
    """summary[w] for a block of w: the P partial rows summed in order. The class columns (w >= 5)
    of a large C come from the int32 histogram the rows kernel counted (HIST), or, with per-class
    sums (SCAN, CCT-EAL), from one ordered pass over the targets and row statistics."""
    col0 = tl.program_id(0) * BLOCK_W
    cols = col0 + tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_W], tl.float64)
    from_parts = cols < WP
    for p0 in range(0, tl.where(col0 < WP, P, 0), BLOCK_N):  # no walk for columns past them
        parts = p0 + tl.arange(0, BLOCK_N)
        vals = tl.load(part_ptr + parts[:, None] * WP + cols[None, :],
                       mask=(parts < P)[:, None] & from_parts[None, :], other=0.0)
        acc += tl.sum(vals, axis=0)
    if HIST:
        hist_cols = (cols >= SUMMARY_HEADER) & (cols < W)
        acc += tl.load(hist_ptr + (cols - SUMMARY_HEADER), mask=hist_cols, other=0).to(tl.float64)
    if SCAN:
        k = cols - SUMMARY_HEADER
        which = k // C  # 0: hist, 1: sum (CE - H), 2: sum V
        cls = k - which * C
        scanned = (cols >= SUMMARY_HEADER) & (cols < W)
        for r0 in range(0, R, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            y_safe, valid, invalid, in_range = _row_targets(tg_ptr, rows, R, C, ignore_index)
            var = tl.load(rs_ptr + R + R + rows, mask=in_range, other=0.0)
            ceh = tl.load(rs_ptr + R + R + R + rows, mask=in_range, other=0.0)
            hit = valid[:, None] & (y_safe[:, None] == cls[None, :]) & scanned[None, :]
            val = tl.where(which[None, :] == 0, 1.0,
                           tl.where(which[None, :] == 1, ceh[:, None], var[:, None]))
            acc += tl.sum(tl.where(hit, val.to(tl.float64), 0.0), axis=0)
    tl.store(sum_ptr + cols, acc, mask=cols < W)


@triton.jit
def _update_flag(big_b, sum_ceh, sum_h, sum_v, n_invalid, update_state):
    """Whether the state updates: a batch with valid rows, no invalid target, finite sums, and
    update_state."""
    finite = ((sum_ceh - sum_ceh) == 0.0) & ((sum_h - sum_h) == 0.0) & ((sum_v - sum_v) == 0.0)
    ok = (big_b > 0.0) & (n_invalid == 0.0) & finite
    return ok & (tl.cast(update_state, tl.int32) != 0)


@triton.jit
def _summary_header(sum_ptr, update_state):
    """The summary's header ([B, sum (CE - H), sum H, sum V, n_invalid]) and whether the state
    updates."""
    big_b = tl.load(sum_ptr)
    sum_ceh = tl.load(sum_ptr + 1)
    sum_h = tl.load(sum_ptr + 2)
    sum_v = tl.load(sum_ptr + 3)
    n_invalid = tl.load(sum_ptr + 4)
    upd = _update_flag(big_b, sum_ceh, sum_h, sum_v, n_invalid, update_state)
    return big_b, sum_ceh, sum_h, sum_v, n_invalid, upd


@triton.jit
def _header_from_parts(part_ptr, P, BLOCK_P: tl.constexpr):
    """The summary header ([8], five used) as the sum of the P partial rows of the rows kernel,
    in program order (the same bits in every program that computes it). ``.cg``: partials other
    programs of the same launch wrote are read past L1."""
    idx = tl.arange(0, 8)
    acc = tl.zeros([8], tl.float64)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        vals = tl.load(part_ptr + parts[:, None] * SUMMARY_HEADER + idx[None, :],
                       mask=(parts < P)[:, None] & (idx < SUMMARY_HEADER)[None, :], other=0.0,
                       cache_modifier=".cg")
        acc += tl.sum(vals, axis=0)
    return acc


@triton.jit
def _pick(v, i):
    return tl.sum(tl.where(tl.arange(0, 8) == i, v, 0.0), axis=0)


@triton.jit
def _mit_counts(st0_ptr, hist_ptr, k0, C, upd, BLOCK_K: tl.constexpr):
    """MiT's class counts k0 .. k0 + BLOCK_K: c = counts (+ the batch's histogram when the state
    updates, stored back then); returns (sum c, sum c log c) of them.

    H* = -sum p log p = log(n) - sum(c log c) / n with n = sum c (float64; the cancellation costs
    about 1e-15 of log n): the counts are read once, never again once n is known."""
    k = k0 + tl.arange(0, BLOCK_K)
    km = k < C
    cnt = tl.load(st0_ptr + k, mask=km, other=0.0)
    hist = tl.load(hist_ptr + k, mask=km, other=0).to(tl.float64)  # float64 or int32 counts
    cnt = tl.where(upd, cnt + hist, cnt)
    tl.store(st0_ptr + k, cnt, mask=tl.where(upd, km, False))
    clogc = tl.where(cnt > 0.0, cnt * tl.log(tl.where(cnt > 0.0, cnt, 1.0)), 0.0)
    return tl.sum(cnt, axis=0), tl.sum(clogc, axis=0)


@triton.jit
def _finalize_body(sum_ptr, loc_ptr, tau_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr, loss_ptr,
                   stats_ptr, gi_ptr, cls_ptr, n_cls, C, K, kind, hp0: tl.float64,
                   hp1: tl.float64, t_eps: tl.float64, t_min: tl.float64, t_max: tl.float64,
                   update_state, reduction, BLOCK_K: tl.constexpr, CLASS_PARTS: tl.constexpr):
    """The finalize of the op contract, in float64, one program. Returns (c, loss is NaN).

    CLASS_PARTS (MiT): other programs have walked the classes (_finalize_classes_kernel) and
    left ``n_cls`` pairs (sum c, sum c log c) at ``cls_ptr``; otherwise this program walks them.
    """
    big_b, sum_ceh, sum_h, sum_v, n_invalid, upd = _summary_header(sum_ptr, update_state)
    loc_b = tl.load(loc_ptr)
    loc_h = tl.load(loc_ptr + 2)
    loc_ce = tl.load(loc_ptr + 1) + loc_h
    b_g = tl.maximum(big_b, 1.0)
    inv_bg = _recip(b_g)
    mean_ce = (sum_ceh + sum_h) * inv_bg
    mean_h = sum_h * inv_bg
    hist_ptr = sum_ptr + SUMMARY_HEADER
    nan = _nan_f64()

    if kind == MIT:  # counts, total_seen, lambda_entropy, dual_updates
        total = tl.zeros([], tl.float64)
        clogc = tl.zeros([], tl.float64)
        if CLASS_PARTS:  # in program order: the same bits every run
            for p0 in range(0, n_cls, BLOCK_K):
                p = p0 + tl.arange(0, BLOCK_K)
                pm = p < n_cls
                total += tl.sum(tl.load(cls_ptr + 2 * p, mask=pm, other=0.0, cache_modifier=".cg"),
                                axis=0)
                clogc += tl.sum(tl.load(cls_ptr + 2 * p + 1, mask=pm, other=0.0,
                                        cache_modifier=".cg"), axis=0)
        else:  # a serial walk, each step waiting on its loads: for small C
            for k0 in range(0, C, BLOCK_K):
                t, c = _mit_counts(st0_ptr, hist_ptr, k0, C, upd, BLOCK_K)
                total += t
                clogc += c
        # A NaN count, or a state of zeros with nothing counted (0 / 0), gives NaN, as in the
        # reference and the C++ kernels (loading refuses such states)
        ent = tl.log(total) - clogc * _recip(total)
        h_star = ent
        lam = tl.load(st2_ptr)
        n_old = _load_count(st3_ptr)
        n_next = tl.where(n_old < 9223372036854775807, n_old + 1, n_old)  # held at int64's max
        n_new = n_next.to(tl.float64)
        # clamps that keep a NaN (tl.maximum and tl.minimum may drop it), as torch.clamp does
        gap = (h_star - mean_h) * _recip(tl.log(tl.cast(C, tl.float64)))
        gap = tl.where(gap < 0.0, 0.0, gap)
        lam_new = (lam * (n_new - 1.0) + gap) * _recip(n_new)
        lam_new = tl.where(lam_new < 0.0, 0.0, tl.where(lam_new > 0.5, 0.5, lam_new))
        coef = tl.where(upd, lam_new, lam)
        tl.store(st2_ptr, lam_new, mask=upd)
        _store_count(st3_ptr, n_next, upd)
        tl.store(st1_ptr, _saturated(tl.load(st1_ptr).to(tl.float64) + big_b,
                                     st1_ptr.dtype.element_ty), mask=upd)
        coef_stat = coef
        reg = tl.zeros([], tl.float64)
    elif kind == TET:  # fixed lambda
        coef = _f64(hp0)
        h_star = tl.zeros([], tl.float64)  # no label entropy: 0, never NaN, in the stats
        coef_stat = coef
        reg = tl.zeros([], tl.float64)
    else:  # CCT (checks.py admits no other kind): label_freq_ema, alpha; hparams =
        # [ema_momentum, entropy_eps]
        ent = tl.zeros([], tl.float64)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < C
            ema = tl.load(st0_ptr + k, mask=km, other=0.0)
            hist = tl.load(hist_ptr + k, mask=km, other=0.0)
            ema = tl.where(upd, hp0 * ema + (1.0 - hp0) * (hist * inv_bg), ema)
            tl.store(st0_ptr + k, ema, mask=tl.where(upd, km, False))
            prob = tl.where(ema < _f64(hp1), _f64(hp1), ema)  # clamp_min: a NaN stays NaN
            # torch.xlogy's p log p: 0 at p = 0 (entropy_eps = 0 and a class never seen), where
            # 0 * log 0 is NaN; a NaN p stays NaN
            ent -= tl.sum(tl.where(km & (prob != 0.0), prob * tl.log(prob), 0.0), axis=0)
        h_star = ent
        alpha = tl.load(st1_ptr)
        coef = -2.0 * alpha * (mean_h - h_star)
        coef_stat = alpha
        reg = alpha * (mean_h - h_star) * (mean_h - h_star)

    # Temperatures: T_0 (or the hist-weighted mean for K = C) and dL/dtau (KERNEL_MATH s.4).
    tau0 = tl.load(tau_ptr)
    temp0, dtemp0 = _temperature(tau0, t_eps, t_min, t_max)
    grad_scale = tl.where(reduction == 1, inv_bg, 1.0)
    temp_sum = tl.zeros([], tl.float64)
    multi = tl.cast(K, tl.int32) > 1  # K = C: class-conditional temperatures
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        tau_k = tl.load(tau_ptr + k, mask=km, other=0.0)
        temp_k, dtemp_k = _temperature(tau_k, t_eps, t_min, t_max)
        temp_k = temp_k.to(tl.float64)
        per_class = tl.where(multi, km, False)
        hist_k = tl.load(hist_ptr + k, mask=per_class, other=0.0)
        temp_sum += tl.sum(hist_k * temp_k, axis=0)
        ceh_k = tl.load(hist_ptr + C + k, mask=per_class, other=0.0)
        var_k = tl.load(hist_ptr + C + C + k, mask=per_class, other=0.0)
        num = tl.where(multi, ceh_k + coef * var_k, sum_ceh + coef * sum_v)
        dtau = -grad_scale * _recip(temp_k) * num * dtemp_k.to(tl.float64)
        # a clamped T passes no gradient, even times an inf sum (0 * inf would be NaN)
        dtau = tl.where((reduction == 0) | (dtemp_k == 0), 0.0, dtau)
        tl.store(gi_ptr + 2 + k, dtau, mask=km)
    # T_0 in the stats; CCT-EAL reports the hist-weighted mean T (the op contract, as the CPU)
    # (one temperature: B T / B, so 0 for a batch with no valid row, as the CPU and CUDA give)
    cct_sum = tl.where(multi, temp_sum, temp0.to(tl.float64) * big_b)
    temp_stat = tl.where(kind == CCT, cct_sum * inv_bg, temp0.to(tl.float64))

    loc_bg = tl.maximum(loc_b, 1.0)
    inv_loc_bg = _recip(loc_bg)
    if kind == CCT:
        mean_form = loc_ce * inv_loc_bg + reg
        sum_form = loc_ce + loc_b * reg
    else:
        mean_form = (loc_ce - coef * loc_h) * inv_loc_bg
        sum_form = loc_ce - coef * loc_h
    is_nan = n_invalid > 0.0
    loss = tl.where(reduction == 2, sum_form, mean_form)
    loss = tl.where(is_nan, nan, tl.where(loc_b == 0.0, 0.0, loss))
    tl.store(loss_ptr, _to_dtype(loss, loss_ptr.dtype.element_ty), mask=reduction != 0)
    # stats report the mean form whatever the reduction (as reference.py does)
    loss_stat = tl.where(is_nan, nan, tl.where(loc_b == 0.0, 0.0, mean_form))

    idx = tl.arange(0, 16)
    stats = tl.where(idx == 0, loss_stat, tl.where(idx == 1, mean_ce, tl.where(idx == 2, mean_h, tl.where(
        idx == 3, h_star, tl.where(idx == 4, coef_stat, tl.where(idx == 5, temp_stat, tl.where(
            idx == 6, upd.to(tl.float64), tl.where(idx == 7, big_b, n_invalid))))))))
    tl.store(stats_ptr + idx, stats, mask=idx < NUM_STATS)
    row_scale = tl.where(reduction == 1, inv_loc_bg, 1.0)
    tl.store(gi_ptr + idx, tl.where(idx == 0, coef, row_scale), mask=idx < 2)
    return coef, is_nan


@triton.jit
def _none_loss_rows(rs_ptr, loss_ptr, rows, R, coef, is_nan):
    in_range = rows < R
    ent = tl.load(rs_ptr + R + rows, mask=in_range, other=0.0).to(tl.float64)
    ceh = tl.load(rs_ptr + R + R + R + rows, mask=in_range, other=0.0).to(tl.float64)
    # CE - c H = (CE - H) + (1 - c) H, in float64 and rounded once (as the C++ kernels);
    # rows that are not valid hold zeros: loss 0
    loss = ceh + (1.0 - coef.to(tl.float64)) * ent
    loss = tl.where(is_nan, _nan_f64(), loss)
    tl.store(loss_ptr + rows, _to_dtype(loss, loss_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _finalize_kernel(sum_ptr, loc_ptr, tau_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr, loss_ptr,
                     stats_ptr, gi_ptr, C, K, kind, hp0: tl.float64, hp1: tl.float64,
                     t_eps: tl.float64, t_min: tl.float64, t_max: tl.float64, update_state,
                     reduction, BLOCK_K: tl.constexpr):
    _finalize_body(sum_ptr, loc_ptr, tau_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr, loss_ptr,
                   stats_ptr, gi_ptr, sum_ptr, 0, C, K, kind, hp0, hp1, t_eps, t_min, t_max,
                   update_state, reduction, BLOCK_K, False)


@triton.jit
def _finalize_classes_kernel(sum_ptr, loc_ptr, tau_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr,
                             loss_ptr, stats_ptr, gi_ptr, cls_ptr, ticket_ptr, part_ptr, P,
                             hist_ptr, C, K, hp0: tl.float64, hp1: tl.float64,
                             t_eps: tl.float64, t_min: tl.float64, t_max: tl.float64,
                             update_state, reduction, BLOCK_K: tl.constexpr,
                             CLASS_BLOCK: tl.constexpr, FROM_PARTS: tl.constexpr,
                             BLOCK_P: tl.constexpr):
    """MiT's finalize for many classes: each program walks CLASS_BLOCK classes (counts, state
    update, sum c and sum c log c into ``cls_ptr``), and the program that draws the last ticket
    (acquire/release, ``ticket_ptr`` zeroed by the launcher) runs the rest of the finalize. MiT
    only (the kind is fixed here: the class walk writes MiT's counts); K = 1 or C temperatures.

    FROM_PARTS (loss_forward_, one temperature): no summary kernel ran. Every program sums the
    rows kernel's P partial headers itself (same order, same bits, so the same update decision)
    and reads the int32 histogram at ``hist_ptr``; the last one writes the header to ``sum_ptr``
    for the finalize. Otherwise the header and the float64 histogram come from the summary.

    Why: one program walking C classes does C float64 logs on one SM, serially (about 45 us at
    C = 32000 on an H200, 160 us at 131072: benchmarks/results/gpu-nvidia-h200-20261126-055026);
    FROM_PARTS also saves the summary's launch, which the host pays for on every step.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if FROM_PARTS:
        header = _header_from_parts(part_ptr, P, BLOCK_P)
        upd = _update_flag(_pick(header, 0), _pick(header, 1), _pick(header, 2),
                           _pick(header, 3), _pick(header, 4), update_state)
        total, clogc = _mit_counts(st0_ptr, hist_ptr, pid * CLASS_BLOCK, C, upd, CLASS_BLOCK)
    else:
        big_b, sum_ceh, sum_h, sum_v, n_invalid, upd = _summary_header(sum_ptr, update_state)
        total, clogc = _mit_counts(st0_ptr, sum_ptr + SUMMARY_HEADER, pid * CLASS_BLOCK, C, upd,
                                   CLASS_BLOCK)
    idx = tl.arange(0, 2)
    tl.store(cls_ptr + 2 * pid + idx, tl.where(idx == 0, total, clogc))
    tl.debug_barrier()  # the partials (and the counts) are issued before the ticket
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    tl.debug_barrier()
    if ticket == nprog - 1:
        if FROM_PARTS:
            idx8 = tl.arange(0, 8)
            tl.store(sum_ptr + idx8, header, mask=idx8 < SUMMARY_HEADER)
            tl.debug_barrier()  # the header written above is read below
        _finalize_body(sum_ptr, loc_ptr, tau_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr, loss_ptr,
                       stats_ptr, gi_ptr, cls_ptr, nprog, C, K, 0, hp0, hp1, t_eps, t_min,
                       t_max, update_state, reduction, BLOCK_K, True)


@triton.jit
def _none_loss_kernel(rs_ptr, gi_ptr, stats_ptr, loss_ptr, R, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _none_loss_rows(rs_ptr, loss_ptr, rows, R, tl.load(gi_ptr), tl.load(stats_ptr + 8) > 0.0)


@triton.jit
def _fused_kernel(x_ptr, tg_ptr, tau_ptr, rs_ptr, sum_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr,
                  loss_ptr, stats_ptr, gi_ptr, R, C, S, stride_n, stride_c, stride_s, K,
                  ignore_index, kind, hp0: tl.float64, hp1: tl.float64, t_eps: tl.float64,
                  t_min: tl.float64, t_max: tl.float64, update_state, reduction,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                  LOCAL_CLASSES: tl.constexpr, PER_CLASS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole forward of a batch that fits one program: rows, summary, finalize, one launch."""
    _rows_body(x_ptr, tg_ptr, tau_ptr, rs_ptr, sum_ptr, sum_ptr, 0, 1, R, C, S, stride_n,
               stride_c, stride_s, ignore_index, t_eps, t_min, t_max, BLOCK_R, BLOCK_C, BLOCK_L,
               LOCAL_CLASSES, PER_CLASS, False, False)
    tl.debug_barrier()  # the summary and row statistics written above are read below
    coef, is_nan = _finalize_body(sum_ptr, sum_ptr, tau_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr,
                                  loss_ptr, stats_ptr, gi_ptr, sum_ptr, 0, C, K, kind, hp0, hp1,
                                  t_eps, t_min, t_max, update_state, reduction, BLOCK_K, False)
    if reduction == 0:
        for r0 in range(0, R, BLOCK_K):
            _none_loss_rows(rs_ptr, loss_ptr, r0 + tl.arange(0, BLOCK_K), R, coef, is_nan)


@triton.jit
def _forward_kernel(x_ptr, tg_ptr, tau_ptr, rs_ptr, part_ptr, ibuf_ptr, sum_ptr, st0_ptr, st1_ptr,
                    st2_ptr, st3_ptr, loss_ptr, stats_ptr, gi_ptr, R, C, S, stride_n, stride_c,
                    stride_s, ignore_index, kind, hp0: tl.float64, hp1: tl.float64,
                    t_eps: tl.float64, t_min: tl.float64, t_max: tl.float64, update_state,
                    reduction, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, SPATIAL: tl.constexpr):
    """The forward of one temperature (MiT, TET) and C <= 1024 in one launch of many programs.

    Each program writes its partial sums and counts its classes into ``ibuf[IBUF_HIST:]``
    (int32, zeroed by the launcher); then takes a ticket from ``ibuf[0]``. The program that
    draws the last ticket sees every partial (acquire/release on the ticket), adds them up in
    program order (bitwise the same every run), writes the summary and runs the finalize: the
    rows, summary and finalize kernels of ``row_stats`` + ``finalize_`` in one launch.

    Only for classes that fit one column block: the last program's walk over the classes is
    serial, and for C = 32000 it cost about 0.1 ms on an H200 (forward 0.38-0.41 ms in one launch
    against 0.27-0.29 ms in three: benchmarks/results/gpu-nvidia-h200-*/kernels.csv), more than
    the two launches it saves.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    _rows_body(x_ptr, tg_ptr, tau_ptr, rs_ptr, part_ptr, ibuf_ptr + HIST_OFFSET, pid, nprog, R,
               C, S, stride_n, stride_c, stride_s, ignore_index, t_eps, t_min, t_max, BLOCK_R,
               BLOCK_C, 0, True, False, True, SPATIAL)
    tl.debug_barrier()  # every thread's partials and counts are issued before the ticket
    ticket = tl.atomic_add(ibuf_ptr, 1, sem="acq_rel")
    tl.debug_barrier()
    if ticket == nprog - 1:
        idx = tl.arange(0, 8)
        tl.store(sum_ptr + idx, _header_from_parts(part_ptr, nprog, BLOCK_P),
                 mask=idx < SUMMARY_HEADER)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            hist = tl.load(ibuf_ptr + HIST_OFFSET + k, mask=k < C, other=0,
                           cache_modifier=".cg")
            tl.store(sum_ptr + SUMMARY_HEADER + k, hist.to(tl.float64), mask=k < C)
        tl.debug_barrier()  # the summary written above is read below
        _finalize_body(sum_ptr, sum_ptr, tau_ptr, st0_ptr, st1_ptr, st2_ptr, st3_ptr, loss_ptr,
                       stats_ptr, gi_ptr, sum_ptr, 0, C, 1, kind, hp0, hp1, t_eps, t_min, t_max,
                       update_state, reduction, BLOCK_K, False)


@triton.jit
def _grad_folded(x, row_max, inv_temp2, log_s2, coef_a, coef_b, ACC: tl.constexpr):
    """dx of a logit but for the target's -scale: p (a + b log2 p), with log2 p =
    (x - m) / T / ln 2 - log2 s (csrc's log_prob) floored, so that a -inf logit (a masked class)
    has p = 0 and a zero gradient, not 0 * -inf. One definition for the row loop and the
    target's rewrite, which must agree."""
    log_p2 = _clamp_shift((_widen(x, ACC) - row_max) * inv_temp2 - log_s2)
    return tl.exp2(log_p2) * (coef_a + coef_b * log_p2)


@triton.jit
def _backward_kernel(g_ptr, g_stride, x_ptr, dx_ptr, tg_ptr, tau_ptr, rs_ptr, gi_ptr, gt_ptr,
                     R, C, S, K, stride_n, stride_c, stride_s, dstride_n, dstride_c, dstride_s,
                     ignore_index, t_eps: tl.float64, t_min: tl.float64, t_max: tl.float64,
                     write_grad_tau, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     PER_CLASS: tl.constexpr, SPATIAL: tl.constexpr):
    """dx = g row_scale / T (p (1 + c (log p + H)) - onehot(y)) (KERNEL_MATH s.3), one pass."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    rows, in_range, n, pix = _tile_rows(pid, R, S, BLOCK_R, SPATIAL)
    y_safe, valid, invalid = _targets_in(tg_ptr, rows, in_range, C, ignore_index)
    temp = _row_temperature(tau_ptr, y_safe, t_eps, t_min, t_max, ACC, PER_CLASS)
    rows64 = rows.to(tl.int64)
    row_max = tl.load(rs_ptr + rows64, mask=in_range, other=0.0)
    ent = tl.load(rs_ptr + R + rows64, mask=in_range, other=0.0)
    log_s = tl.load(rs_ptr + R + R + R + R + rows64, mask=in_range, other=0.0)
    coef = tl.load(gi_ptr)
    row_scale = tl.load(gi_ptr + 1)
    g = tl.load(g_ptr + rows64 * g_stride, mask=in_range, other=0.0).to(ACC)
    inv_temp = _recip(temp)
    scale = tl.where(valid, g * row_scale * inv_temp, 0.0)
    # In base 2, as the forward (and csrc's grad_logit_folded): with l = log2 p,
    # dx = p (a + b l) - scale onehot(y), a = scale (1 + c H), b = scale c ln 2. Per element that
    # is exp2 (one instruction; exp is a multiply and a range fix-up around it), an FMA and a
    # multiply, and the select of ignored rows.
    ln2 = _ln2(ACC)
    inv_ln2 = _recip(ln2)
    inv_temp2 = inv_temp * inv_ln2
    log_s2 = log_s * inv_ln2
    coef_a = scale * (1.0 + coef * ent)
    coef_b = scale * coef * ln2
    base = _bases(n, pix, stride_n, stride_s)
    dbase = _bases(n, pix, dstride_n, dstride_s)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cols64 = cols.to(tl.int64)
        mask = in_range[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + (base[:, None] + cols64[None, :] * stride_c), mask=mask, other=0.0)
        dx = _grad_folded(x, row_max[:, None], inv_temp2[:, None], log_s2[:, None],
                          coef_a[:, None], coef_b[:, None], ACC)
        dx = tl.where(valid[:, None], dx, 0.0)
        tl.store(dx_ptr + (dbase[:, None] + cols64[None, :] * dstride_c),
                 _to_dtype(dx, dx_ptr.dtype.element_ty), mask=mask)
    # The target's element again, now with its -scale: one gathered load and store a row instead
    # of a compare and select an element. The barrier orders it after the loop's store of the
    # same element, which another thread of the program may have made.
    tl.debug_barrier()
    y64 = y_safe.to(tl.int64)
    x_y = tl.load(x_ptr + (base + y64 * stride_c), mask=valid, other=0.0)
    dx_y = _grad_folded(x_y, row_max, inv_temp2, log_s2, coef_a, coef_b, ACC) - scale
    tl.store(dx_ptr + (dbase + y64 * dstride_c), _to_dtype(dx_y, dx_ptr.dtype.element_ty),
             mask=valid)
    if pid == 0:
        # Masked: with reduction='none' the upstream gradient may hold no element at all (an
        # empty batch), and this scalar is only read for the mean and sum forms.
        g0 = tl.load(g_ptr, mask=write_grad_tau != 0, other=0.0).to(tl.float64)
        for k0 in range(0, K, 128):
            k = k0 + tl.arange(0, 128)
            km = k < K
            dtau = tl.load(gi_ptr + 2 + k, mask=km, other=0.0).to(tl.float64)
            gt = tl.where(write_grad_tau != 0, g0 * dtau, 0.0)
            tl.store(gt_ptr + k, gt.to(gt_ptr.dtype.element_ty), mask=km)


@triton.jit
def _grad_tau_none_kernel(g_ptr, tg_ptr, tau_ptr, rs_ptr, gi_ptr, gt_ptr, R, C, K, ignore_index,
                          t_eps: tl.float64, t_min: tl.float64, t_max: tl.float64,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """reduction='none': dL/dtau_k = sum_{r: y_r = k (any r when K = 1)} g_r (-1/T_k)
    (CE_r - H_r + c V_r) T'(tau_k), rows summed in order."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    coef = tl.load(gi_ptr).to(tl.float64)
    acc = tl.zeros([BLOCK_K], tl.float64)
    for r0 in range(0, R, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        y_safe, valid, invalid, in_range = _row_targets(tg_ptr, rows, R, C, ignore_index)
        var = tl.load(rs_ptr + R + R + rows, mask=in_range, other=0.0).to(tl.float64)
        ceh = tl.load(rs_ptr + R + R + R + rows, mask=in_range, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + rows, mask=in_range, other=0.0).to(tl.float64)
        val = g * (ceh + coef * var)
        cls = tl.where(tl.cast(K, tl.int32) > 1, y_safe, 0)
        hit = valid[:, None] & (cls[:, None] == k[None, :])
        acc += tl.sum(tl.where(hit, val[:, None], 0.0), axis=0)
    tau = tl.load(tau_ptr + k, mask=km, other=0.0)
    temp, dtemp = _temperature(tau, t_eps, t_min, t_max)
    gt = -acc * _recip(temp.to(tl.float64)) * dtemp.to(tl.float64)
    gt = tl.where(dtemp == 0, 0.0, gt)  # clamped: no gradient, even times an inf sum
    tl.store(gt_ptr + k, gt.to(gt_ptr.dtype.element_ty), mask=km)


# ------------------------------------------------------------------------------------------------
# Launchers: the kernel functions of the op contract (ops.py), no host synchronisation.
# ------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _max_programs(device_index: Optional[int], per_sm: int) -> int:
    if device_index is None:  # the interpreter on CPU: a few programs exercise the partials
        return 4
    return per_sm * torch.cuda.get_device_properties(device_index).multi_processor_count


def _program_cap(device: torch.device, per_sm: int = 8) -> int:
    if device.type != "cuda":
        return _max_programs(None, per_sm)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_programs(index, per_sm)


def _tile_count(cfg: RowConfig, logits: Tensor, spatial: bool = False) -> int:
    """As the kernels' _num_tiles: tiles of block_r rows, or of block_r pixels of one sample."""
    n, _, s = logits.shape
    return n * triton.cdiv(s, cfg.block_r) if spatial else triton.cdiv(n * s, cfg.block_r)


def _num_programs(cfg: RowConfig, logits: Tensor, spatial: bool = False) -> int:
    return max(1, min(_tile_count(cfg, logits, spatial),
                      _program_cap(logits.device, cfg.programs_per_sm)))


def _fits_one_program(cfg: RowConfig, rows: int) -> bool:
    return cfg.local_classes and rows * cfg.block_c <= FUSED_MAX_ELEMENTS


def _launch_row_stats(logits, targets, tau, t_eps, t_min, t_max, ignore_index):
    n, c, s = logits.shape
    rows = n * s
    per_class = tau.shape[0] > 1
    cfg = row_config(c, logits.dtype)
    row_stats = _plans.empty((ROW_STATS, rows), dtype=_acc_dtype(logits.dtype),
                             device=logits.device)
    width = summary_size(c, tau.shape[0])
    summary = _plans.empty((width,), dtype=torch.float64, device=logits.device)
    nprog = _num_programs(cfg, logits)
    counting = atomic_hist(per_class)
    part_width = width if cfg.local_classes and not counting else HEADER
    partials = _plans.empty((nprog, part_width), dtype=torch.float64, device=logits.device)
    hist = _plans.zeros((c if counting else 1,), dtype=torch.int32, device=logits.device)
    _plans.launch(_rows_kernel, (nprog,),
        logits, targets, tau, row_stats, partials, hist, rows, c, s, *logits.stride(),
        ignore_index, t_eps, t_min, t_max, **rows_constexprs(cfg, per_class, logits.dtype),
        ATOMIC_HIST=counting, num_warps=cfg.num_warps)
    summary_ce = summary_constexprs(cfg, per_class)
    _plans.launch(_summary_kernel, (triton.cdiv(width, summary_ce["BLOCK_W"]),),
        partials, nprog, part_width, row_stats, targets, hist, summary, rows, c, width,
        ignore_index, **summary_ce, num_warps=SUMMARY_WARPS)
    return row_stats, summary


MAX_ROWS = TRITON_MAX_ROWS  # rows are 32-bit indices here (mitkernels/_backends.py)


def _check_rows(logits: Tensor) -> None:
    n, c, s = logits.shape
    if c < 1:  # a target would index a temperature or class that is not there
        raise ValueError(f"the Triton kernels need at least one class, got C = {c}")
    if c > MAX_ROWS:  # the column loops count in 32 bits: c0 + BLOCK_C must not wrap
        raise ValueError(
            f"the Triton kernels take at most {MAX_ROWS} classes, got {c}: use backend='cuda' or "
            "'cpu' (their kernels index classes in 64 bits; the automatic choice takes 'cuda' "
            "there when it is built)")
    if n * s > MAX_ROWS:
        raise ValueError(
            f"the Triton kernels take at most {MAX_ROWS} rows (N x d1 x ...), got {n * s}: "
            "split the batch, or use backend='cuda' or 'cpu' (their kernels index rows in 64 "
            "bits; the automatic choice takes 'cuda' there when it is built)")


def row_stats(logits: Tensor, targets: Tensor, tau: Tensor, t_eps: float, t_min: float,
              t_max: float, ignore_index: int) -> Tuple[Tensor, Tensor]:
    _checks.row_inputs(logits, targets, tau, "row_stats")
    _check_rows(logits)
    return _launch_row_stats(logits, targets.contiguous(), tau.contiguous(), t_eps, t_min, t_max,
                             ignore_index)


def _state_pointers(state: Sequence[Tensor], kind: int, dummy_f64: Tensor) -> List[Tensor]:
    """The four state slots of the kernels (unused ones get a dummy that is never touched)."""
    ptrs = list(state)
    if kind == KIND_MIT:
        return ptrs
    ptrs = ptrs + [dummy_f64] * (3 - len(ptrs))
    return ptrs + [_plans.empty((1,), dtype=torch.int64, device=dummy_f64.device)]


def _hparams(hparams: Sequence[float]) -> Tuple[float, float]:
    hp = [float(h) for h in hparams] + [0.0, 0.0]
    return hp[0], hp[1]


def _finalize_outputs(rows: int, device, acc: torch.dtype, num_temperatures: int, reduction: int,
                      loss_dtype: torch.dtype):
    loss = _plans.empty((rows,) if reduction == 0 else (), dtype=loss_dtype, device=device)
    stats = _plans.empty((STATS_LEN,), dtype=torch.float64, device=device)
    grad_info = _plans.empty((2 + num_temperatures,), dtype=acc, device=device)
    return loss, stats, grad_info


def _launch_none_loss(row_stats: Tensor, grad_info: Tensor, stats: Tensor, loss: Tensor) -> None:
    """reduction='none': the per-row loss once the finalize has written c (grad_info[0])."""
    rows = row_stats.shape[1]
    if rows > 0:
        _plans.launch(_none_loss_kernel, (triton.cdiv(rows, NONE_LOSS_BLOCK),),
            row_stats, grad_info, stats, loss, rows, BLOCK=NONE_LOSS_BLOCK,
            num_warps=NONE_LOSS_WARPS)


def finalize_(summary: Tensor, local_summary: Optional[Tensor], row_stats: Tensor, tau: Tensor,
              state: List[Tensor], kind: int, hparams: List[float], t_eps: float, t_min: float,
              t_max: float, reduction: int, update_state: bool,
              loss_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    num_classes = _checks.finalize_inputs(
        _checks.summaries(summary, local_summary), row_stats, tau, state, kind, hparams,
        reduction, loss_dtype, summary.device)
    _checks.mark_state_written(state, kind, update_state)
    local = None if local_summary is None else local_summary.contiguous()
    return _launch_finalize(summary.contiguous(), local, row_stats.contiguous(), tau.contiguous(),
                            state, kind, hparams, t_eps, t_min, t_max, reduction, update_state,
                            loss_dtype, num_classes)


def _launch_finalize(summary, local_summary, row_stats, tau, state, kind, hparams, t_eps, t_min,
                     t_max, reduction, update_state, loss_dtype, num_classes):
    """finalize_ on checked, contiguous inputs, the state already marked written (loss_forward_
    calls it after its own checks)."""
    num_temperatures = tau.shape[0]
    rows = row_stats.shape[1]
    loss, stats, grad_info = _finalize_outputs(rows, summary.device, row_stats.dtype,
                                               num_temperatures, reduction, loss_dtype)
    st = _state_pointers(state, kind, summary)
    hp0, hp1 = _hparams(hparams)
    local = summary if local_summary is None else local_summary
    if kind == KIND_MIT and num_classes > FINALIZE_BLOCK:
        ticket = _plans.zeros((1,), dtype=torch.int32, device=summary.device)
        # the partials and histogram of FROM_PARTS unused: the summary has them
        _launch_finalize_classes(summary, local, tau, st, loss, stats, grad_info, ticket,
                                 summary, 0, ticket, num_classes, num_temperatures, hp0, hp1,
                                 t_eps, t_min, t_max, update_state, reduction, False)
    else:
        _plans.launch(_finalize_kernel, (1,),
            summary, local, tau, *st, loss, stats, grad_info, num_classes, num_temperatures,
            kind, hp0, hp1, t_eps, t_min, t_max, int(bool(update_state)), reduction,
            BLOCK_K=FINALIZE_BLOCK, num_warps=FINALIZE_WARPS)
    if reduction == 0:
        _launch_none_loss(row_stats, grad_info, stats, loss)
    return loss, stats, grad_info


def _forward_buffers(logits, cfg, summary_len, reduction, loss_dtype, spatial=False):
    """What a forward of one temperature whose programs count classes by integer atomics and
    take a ticket allocates: partials, ``ibuf = [ticket, 3 unused, hist[C]]`` (IBUF_HIST) zeroed
    in one memset, the summary, outputs."""
    n, c, s = logits.shape
    rows = n * s
    device = logits.device
    acc = _acc_dtype(logits.dtype)
    nprog = _num_programs(cfg, logits, spatial)
    rs = _plans.empty((ROW_STATS, rows), dtype=acc, device=device)
    partials = _plans.empty((nprog, HEADER), dtype=torch.float64, device=device)
    ibuf = _plans.zeros((IBUF_HIST + c,), dtype=torch.int32, device=device)
    summary = _plans.empty((summary_len,), dtype=torch.float64, device=device)
    loss, stats, grad_info = _finalize_outputs(rows, device, acc, 1, reduction, loss_dtype)
    return nprog, rs, partials, ibuf, summary, loss, stats, grad_info


def _launch_finalize_classes(summary, local, tau, st, loss, stats, grad_info, ticket, partials,
                             num_partials, hist, num_classes, num_temperatures, hp0, hp1, t_eps,
                             t_min, t_max, update_state, reduction, from_parts):
    nprog = triton.cdiv(num_classes, CLASS_BLOCK)
    parts = _plans.empty((nprog, 2), dtype=torch.float64, device=summary.device)
    _plans.launch(_finalize_classes_kernel, (nprog,),
        summary, local, tau, *st, loss, stats, grad_info, parts, ticket, partials, num_partials,
        hist, num_classes, num_temperatures, hp0, hp1, t_eps, t_min, t_max,
        int(bool(update_state)), reduction, **classes_constexprs(from_parts),
        num_warps=CLASS_WARPS)


def _launch_forward_wide(logits, targets, tau, state, hparams, t_eps, t_min, t_max, ignore_index,
                         reduction, update_state, loss_dtype, cfg):
    """MiT with one temperature and rows wider than a block: the rows kernel, then
    _finalize_classes_kernel reading its partials and integer histogram (FROM_PARTS), with no
    summary kernel between them; one memset zeroes the ticket and the histogram together."""
    n, c, s = logits.shape
    # the summary is the header only: the finalize reads no class column of it here
    nprog, rs, partials, ibuf, summary, loss, stats, grad_info = _forward_buffers(
        logits, cfg, HEADER, reduction, loss_dtype)
    st = _state_pointers(state, KIND_MIT, summary)
    hp0, hp1 = _hparams(hparams)
    rows = n * s
    hist = ibuf[IBUF_HIST:]
    _plans.launch(_rows_kernel, (nprog,),
        logits, targets, tau, rs, partials, hist, rows, c, s, *logits.stride(), ignore_index,
        t_eps, t_min, t_max, **rows_constexprs(cfg, False, logits.dtype), ATOMIC_HIST=True,
        num_warps=cfg.num_warps)
    _launch_finalize_classes(summary, summary, tau, st, loss, stats, grad_info, ibuf, partials,
                             nprog, hist, c, 1, hp0, hp1, t_eps, t_min, t_max, update_state,
                             reduction, True)
    if reduction == 0:
        _launch_none_loss(rs, grad_info, stats, loss)
    return loss, stats, rs, grad_info


@_plans.recordable(lambda logits, targets, tau, state, *_: (logits, targets, tau, *state))
def loss_forward_(logits: Tensor, targets: Tensor, tau: Tensor, state: List[Tensor], kind: int,
                  hparams: List[float], t_eps: float, t_min: float, t_max: float,
                  ignore_index: int, reduction: int, update_state: bool,
                  loss_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _checks.row_inputs(logits, targets, tau, "loss_forward_")
    _check_rows(logits)
    n, c, s = logits.shape
    _checks.state_and_options(state, kind, hparams, loss_dtype, c, logits.device, reduction)
    _checks.mark_state_written(state, kind, update_state)
    targets, tau = targets.contiguous(), tau.contiguous()
    rows = n * s
    cfg = row_config(c, logits.dtype)
    num_temperatures = tau.shape[0]
    if not _fits_one_program(cfg, rows):
        if num_temperatures == 1 and cfg.local_classes:
            spatial = spatial_config(logits)
            return _launch_forward(logits, targets, tau, state, kind, hparams, t_eps, t_min,
                                   t_max, ignore_index, reduction, update_state, loss_dtype,
                                   spatial or cfg, spatial is not None)
        if num_temperatures == 1 and kind == KIND_MIT:
            return _launch_forward_wide(logits, targets, tau, state, hparams, t_eps, t_min, t_max,
                                        ignore_index, reduction, update_state, loss_dtype, cfg)
        rs, summary = _launch_row_stats(logits, targets, tau, t_eps, t_min, t_max, ignore_index)
        loss, stats, grad_info = _launch_finalize(summary, None, rs, tau, state, kind, hparams,
                                                  t_eps, t_min, t_max, reduction, update_state,
                                                  loss_dtype, c)
        return loss, stats, rs, grad_info
    acc = _acc_dtype(logits.dtype)
    rs = _plans.empty((ROW_STATS, rows), dtype=acc, device=logits.device)
    summary = _plans.empty((summary_size(c, num_temperatures),), dtype=torch.float64,
                          device=logits.device)
    loss, stats, grad_info = _finalize_outputs(rows, logits.device, acc, num_temperatures,
                                               reduction, loss_dtype)
    st = _state_pointers(state, kind, summary)
    hp0, hp1 = _hparams(hparams)
    _plans.launch(_fused_kernel, (1,),
        logits, targets, tau, rs, summary, *st, loss, stats, grad_info, rows, c, s,
        *logits.stride(), num_temperatures, ignore_index, kind, hp0, hp1, t_eps, t_min, t_max,
        int(bool(update_state)), reduction,
        **rows_constexprs(cfg, num_temperatures > 1, logits.dtype),
        BLOCK_K=FUSED_BLOCK_K, num_warps=cfg.num_warps)
    return loss, stats, rs, grad_info


def _launch_forward(logits, targets, tau, state, kind, hparams, t_eps, t_min, t_max, ignore_index,
                    reduction, update_state, loss_dtype, cfg, spatial):
    """loss_forward_ with one temperature and C <= 1024 in one launch of _forward_kernel (plus the
    zeroing of its counters, and the per-row loss of reduction='none')."""
    n, c, s = logits.shape
    rows = n * s
    nprog, rs, partials, ibuf, summary, loss, stats, grad_info = _forward_buffers(
        logits, cfg, summary_size(c, 1), reduction, loss_dtype, spatial)
    st = _state_pointers(state, kind, summary)
    hp0, hp1 = _hparams(hparams)
    _plans.launch(_forward_kernel, (nprog,),
        logits, targets, tau, rs, partials, ibuf, summary, *st, loss, stats, grad_info, rows, c, s,
        *logits.stride(), ignore_index, kind, hp0, hp1, t_eps, t_min, t_max,
        int(bool(update_state)), reduction, **forward_constexprs(cfg, spatial),
        num_warps=cfg.num_warps)
    if reduction == 0:
        _launch_none_loss(rs, grad_info, stats, loss)
    return loss, stats, rs, grad_info


@_plans.recordable(lambda *args: args[:6])  # grad_loss, logits, targets, tau, row_stats, grad_info
def loss_backward(grad_loss: Tensor, logits: Tensor, targets: Tensor, tau: Tensor,
                  row_stats: Tensor, grad_info: Tensor, t_eps: float, t_min: float, t_max: float,
                  ignore_index: int, reduction: int,
                  compute_grad_tau: bool) -> Tuple[Tensor, Tensor]:
    _, _, _, rows, num_temperatures = _checks.row_inputs(logits, targets, tau, "loss_backward")
    _check_rows(logits)
    _checks.backward_inputs(grad_loss, row_stats, grad_info, rows, num_temperatures,
                            _acc_dtype(logits.dtype), reduction, logits.device)
    targets, tau = targets.contiguous(), tau.contiguous()
    row_stats, grad_info = row_stats.contiguous(), grad_info.contiguous()
    n, c, s = logits.shape
    spatial = spatial_config(logits, backward=True)
    cfg = spatial or row_config(c, logits.dtype)
    # the logits' strides when dense (ops._grad_logits_like)
    grad_logits = _plans.empty_like(logits)
    grad_tau = _plans.empty_like(tau)
    grad_loss = grad_loss.contiguous()
    g_stride = 1 if (reduction == 0 and grad_loss.dim() > 0) else 0
    _plans.launch(_backward_kernel, (max(1, _tile_count(cfg, logits, spatial is not None)),),
        grad_loss, g_stride, logits, grad_logits, targets, tau, row_stats, grad_info, grad_tau,
        rows, c, s, num_temperatures, *logits.stride(), *grad_logits.stride(), ignore_index,
        t_eps, t_min, t_max, int(bool(compute_grad_tau) and reduction != 0),
        **backward_constexprs(cfg, num_temperatures > 1, spatial is not None),
        num_warps=cfg.num_warps)
    if compute_grad_tau and reduction == 0:
        _plans.launch(_grad_tau_none_kernel, (triton.cdiv(num_temperatures, GRAD_TAU_BLOCK_K),),
            grad_loss, targets, tau, row_stats, grad_info, grad_tau, rows, c, num_temperatures,
            ignore_index, t_eps, t_min, t_max, BLOCK_N=GRAD_TAU_BLOCK_N,
            BLOCK_K=GRAD_TAU_BLOCK_K, num_warps=GRAD_TAU_WARPS)
    return grad_logits, grad_tau


KERNELS = {
    "_rows_kernel": _rows_kernel,
    "_summary_kernel": _summary_kernel,
    "_finalize_kernel": _finalize_kernel,
    "_finalize_classes_kernel": _finalize_classes_kernel,
    "_none_loss_kernel": _none_loss_kernel,
    "_fused_kernel": _fused_kernel,
    "_forward_kernel": _forward_kernel,
    "_backward_kernel": _backward_kernel,
    "_grad_tau_none_kernel": _grad_tau_none_kernel,
}

__all__ = ["ROW_TABLE", "ROW_TABLE_16", "ROW_TABLE_FP64", "RowConfig",
           "SPATIAL_BACKWARD_TABLE_16", "SPATIAL_TABLE", "SPATIAL_TABLE_16", "finalize_",
           "launch_variants", "loss_backward", "loss_forward_", "row_config", "row_stats",
           "row_table", "spatial_config", "spatial_table"]
