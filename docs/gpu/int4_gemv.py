"""A study, not part of the benchmark step (docs/BENCHMARKS.md, "int4 at batch 1: kernel by
kernel"): a Triton matrix-vector kernel over torchao's int4 weights (Int4TilePackedTo4dTensor,
tinygemm's layout), reading the packed bytes as they are, to see whether tinygemm's 1.1-1.8 TB/s
at batch 1 on the H100 leaves room. It matches tinygemm's results (relative difference 0.004) but
is 24% slower over a layer: kept with its measurements, not wired into the step.

The layout (aten/src/ATen/native/cuda/int4mm.cu, matrix_to_m16n8k16_Bint4_layout, inner_k_tiles 8):
qdata int32 [n/8, k/128, 32, 4]; within one (n-tile, k-tile) block the int32 at [lane t][p] holds
row n = 8*n_tile + t//4 and, with c = t % 4 and base = 128*k_tile + 32*p, the 8 values
  bits 4j..4j+3       (j = 0..3): k = base + 2c + 8j        (even k)
  bits 16+4j..16+4j+3 (j = 0..3): k = base + 2c + 8j + 1    (odd k)
scale_and_zero bf16 [k/group, n, 2]; a weight is (q - 8) * scale + zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

K_TILE = 128  # k values per (n-tile, k-tile) block of tinygemm's layout with inner_k_tiles = 8


# One int32 of tinygemm's layout times its 8 inputs, summed: per nibble pair (even k, odd k) one
# lop3 makes bf16x2 128 + q (tinygemm's own trick), an fma makes q - 8, and an fma accumulates the
# products in bf16x2; then one add in fp32. About 2.3 instructions a weight: a plain
# convert-and-FMA kernel spends 4 and is ALU-bound at half the bandwidth.
_WORD_DOT_ASM = """
{
.reg .b32 t, v, s, acc, one, bias;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 one, 0x3F803F80;
mov.b32 bias, 0xC308C308;
lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 v, t, one, bias;
mul.rn.bf16x2 acc, v, $2;
shr.u32 s, $1, 4;
lop3.b32 t, s, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 v, t, one, bias;
fma.rn.bf16x2 acc, v, $3, acc;
shr.u32 s, $1, 8;
lop3.b32 t, s, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 v, t, one, bias;
fma.rn.bf16x2 acc, v, $4, acc;
shr.u32 s, $1, 12;
lop3.b32 t, s, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 v, t, one, bias;
fma.rn.bf16x2 acc, v, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.bf16 flo, lo;
cvt.f32.bf16 fhi, hi;
add.f32 $0, flo, fhi;
}
"""

_WORD_DOT: tl.constexpr = tl.constexpr(_WORD_DOT_ASM)


@triton.jit
def _int4_gemv_kernel(x_ptr, x_sums_ptr, q_ptr, sz_ptr, out_ptr, n_padded, k_tiles_stored,
                      K_TILES: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, GROUP_TILES: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_KT: tl.constexpr):
    # x_ptr: the input as int32 pairs of bf16; x_sums_ptr: its sum per k-tile (fp32).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_padded
    u = tl.arange(0, 16)  # (lane % 4) * 4 + p within a row's 16 int32 of a block
    kt_offsets = tl.arange(0, BLOCK_KT)
    row_base = (n // 8) * k_tiles_stored * 128 + (n % 8) * 16
    pair_in_tile = 16 * (u % 4) + u // 4  # (32p + 2c) / 2: the int32 holding inputs (k, k + 1)
    # reduced once after the loop: a reduction across lanes per step costs more than the FMAs
    acc = tl.zeros([BLOCK_N, BLOCK_KT, 16], dtype=tl.float32)
    acc_zero = tl.zeros([BLOCK_N, BLOCK_KT], dtype=tl.float32)
    for step in range(0, TILES_PER_SPLIT, BLOCK_KT):
        kt = pid_k * TILES_PER_SPLIT + step + kt_offsets
        kt_ok = (kt < K_TILES) & (step + kt_offsets < TILES_PER_SPLIT)
        q = tl.load(q_ptr + row_base[:, None, None] + kt[None, :, None] * 128 + u[None, None, :],
                    mask=n_ok[:, None, None] & kt_ok[None, :, None], other=0)
        x_base = x_ptr + kt[:, None] * 64 + pair_in_tile[None, :]
        # masked inputs are zero, so masked weights add nothing
        x0 = tl.broadcast_to(tl.load(x_base, mask=kt_ok[:, None], other=0)[None, :, :], q.shape)
        x1 = tl.broadcast_to(tl.load(x_base + 4, mask=kt_ok[:, None], other=0)[None, :, :], q.shape)
        x2 = tl.broadcast_to(tl.load(x_base + 8, mask=kt_ok[:, None], other=0)[None, :, :], q.shape)
        x3 = tl.broadcast_to(tl.load(x_base + 12, mask=kt_ok[:, None], other=0)[None, :, :], q.shape)
        dots = tl.inline_asm_elementwise(_WORD_DOT, "=r,r,r,r,r,r", [q, x0, x1, x2, x3],
                                         dtype=tl.float32, is_pure=True, pack=1)
        group = kt // GROUP_TILES
        sz = sz_ptr + (group[None, :] * n_padded + n[:, None]) * 2
        both_ok = n_ok[:, None] & kt_ok[None, :]
        scale = tl.load(sz, mask=both_ok, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=both_ok, other=0.0).to(tl.float32)
        x_sums = tl.load(x_sums_ptr + kt, mask=kt_ok, other=0.0)
        acc += dots * scale[:, :, None]
        acc_zero += zero * x_sums[None, :]
    out = tl.sum(tl.sum(acc, axis=2), axis=1) + tl.sum(acc_zero, axis=1)
    tl.store(out_ptr + pid_k * n_padded + n, out, mask=n_ok)


def launch_config(n_padded: int, k_tiles: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_KT, split, num_warps): enough programs to fill the GPU's SMs several times."""
    block_n, block_kt, warps = 16, 2, 4
    programs = -(-n_padded // block_n)
    split = 1
    while programs * split < 4 * 132 and k_tiles // (split * 2) >= 2 * block_kt:
        split *= 2
    return block_n, block_kt, split, warps


def int4_gemv(x: torch.Tensor, qdata: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int,
              in_features: int, out_features: int, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [1, in_features] (bf16) times the packed weight, [1, out_features] bf16."""
    n_padded = qdata.shape[0] * 8
    k_tiles_stored = qdata.shape[1]
    k_tiles = -(-in_features // K_TILE)
    block_n, block_kt, split, warps = config or launch_config(n_padded, k_tiles)
    tiles_per_split = -(-k_tiles // split)
    if in_features % K_TILE:  # the kernel reads whole k-tiles of x: pad with zeros
        x = torch.nn.functional.pad(x, (0, k_tiles * K_TILE - in_features))
    x = x.contiguous()
    x_sums = x.view(k_tiles, K_TILE).float().sum(1)
    partial = torch.empty(split, n_padded, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n_padded, block_n), split)
    _int4_gemv_kernel[grid](x.view(torch.int32), x_sums, qdata, scale_and_zero, partial, n_padded, k_tiles_stored,
                            K_TILES=k_tiles, TILES_PER_SPLIT=tiles_per_split, GROUP_TILES=group_size // K_TILE,
                            BLOCK_N=block_n, BLOCK_KT=block_kt, num_warps=warps)
    return partial.sum(0)[:out_features].to(x.dtype)[None]
