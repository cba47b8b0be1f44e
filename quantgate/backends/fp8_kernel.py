"""A block-FP8 matmul in plain torch, for transformers' FineGrainedFP8 layers where the Hub kernel
(`kernels-community/finegrained-fp8`) cannot be had: offline, or without the `kernels` package.

It computes what the Hub kernel computes: activations quantized to float8 e4m3 per token and per
K block (scale = amax / 448, floored at 1e-12 as the Hub kernel floors it), weights dequantized per
(block_n x block_k) block with their `weight_scale_inv`, products summed in float32. Dequantizing
both sides and multiplying in float32 equals the kernel's per-block `dot(a, b) * a_s * b_s` up to
the order of the float32 sums. It is a reference, not a serving kernel: latency measured on it says
nothing about FP8 serving speed.

On a CPU, turning every weight into float32 at every call costs 30 times the matmul itself (SmolLM2, one token), so
the float32 weights are kept while they fit `keep_bytes` (a quarter of the memory available when first asked);
the same numbers, computed once. The benchmark's processes keep none, since they measure the model's memory.

On a Hopper GPU with cuBLAS 12.9 or later, 128x128 weight blocks run on torch's own block-scaled FP8 matmul
(`torch.nn.functional.scaled_mm`, 1x128 activation blocks against 128x128 weight blocks): the same quantization of the
activations, the products in FP8 tensor cores, a serving kernel. Other block sizes, and other devices, run the
reference.

transformers 5.23 takes it two ways: `_FINEGRAINED_FP8` (the cache `load_finegrained_fp8_kernel`
reads before asking for the `kernels` package) and the name lookup of `lazy_load_kernel`.
"""
from __future__ import annotations

import sys
import threading
import weakref

import torch

FP8_MAX = 448.0
REFERENCE = "quantgate reference block-FP8 matmul (torch, dequantized per block, float32 sums)"
HUB = "kernels-community/finegrained-fp8 (the Hub kernel, through the kernels package)"
SCALED_MM = "torch's scaled_mm, 1x128 activation blocks against 128x128 weight blocks (cuBLAS, FP8 tensor cores)"


def quantize_activations(x: torch.Tensor, block_k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The activations as the kernel sees them: e4m3 values times their scale, in float32. Dynamic (scale
    None): one scale per token and K block; static: the given per-tensor scale."""
    x = x.float()
    if scale is not None:
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -k % block_k))  # zeros leave each block's amax as it is
    codes, scales = activation_blocks(padded, block_k)
    return (codes.float().unflatten(-1, (-1, block_k)) * scales[..., None]).flatten(-2)[..., :k]


def activation_blocks(x: torch.Tensor, block_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) activations as e4m3 codes and their scales (..., K/block_k): amax / 448 per token and K block, as the
    Hub kernel quantizes them (the scale floored at 1e-12 where it divides)."""
    groups = x.float().unflatten(-1, (-1, block_k))
    scales = groups.abs().amax(-1, keepdim=True) / FP8_MAX
    codes = (groups / scales.clamp(min=1e-12)).to(torch.float8_e4m3fn).flatten(-2)
    return codes, scales.squeeze(-1)


# Every e4m3 code as float32: looking codes up converts a CPU tensor twice as fast as `.float()`, exactly.
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
keep_bytes: int | None = None  # None: a quarter of the memory available when first asked; 0: keep none
# id(weight) -> (its weakref, what it was computed from, float32 weights); one lock for the dict and its bytes
_kept: dict[int, tuple] = {}
_kept_bytes = 0
_lock = threading.RLock()  # re-entered where a collected layer's callback runs while it is held


def as_float(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.float8_e4m3fn and weight.device.type == "cpu":
        return E4M3.take(weight.view(torch.uint8).long())
    return weight.float()


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """(..., N, K) e4m3 weights times their per-block scales, in float32."""
    values = as_float(weight)
    if block_size is None:
        return values * scale_inv.float()
    (n, k), (bn, bk) = weight.shape[-2:], block_size
    if n % bn == 0 and k % bk == 0:  # one scale per (bn, bk) tile, broadcast over it
        tiles = values.unflatten(-1, (k // bk, bk)).unflatten(-3, (n // bn, bn))
        return (tiles * scale_inv.float()[..., :, None, :, None]).flatten(-4, -3).flatten(-2)
    scales = scale_inv.float().repeat_interleave(bn, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :k]
    return values * scales


def _budget() -> int:
    global keep_bytes
    if keep_bytes is None:
        import psutil

        keep_bytes = psutil.virtual_memory().available // 4
    return keep_bytes


def _source(weight: torch.Tensor, scale_inv: torch.Tensor) -> tuple:
    """What a kept copy was computed from: the same tensors, at the same storage, unedited."""
    return (weight.data_ptr(), weight._version, id(scale_inv), scale_inv.data_ptr(), scale_inv._version)


def _forget(key: int) -> None:
    global _kept_bytes
    with _lock:
        if (entry := _kept.pop(key, None)) is not None:
            _kept_bytes -= entry[2].nbytes


def kept_float(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor | None:
    """The float32 weights of a CPU layer, computed once and kept while the budget allows; None where not kept."""
    global _kept_bytes
    if weight.device.type != "cpu" or weight.is_inference() or scale_inv.is_inference() or not _budget():
        return None  # an inference tensor has no version to tell an edit by
    key, source = id(weight), _source(weight, scale_inv)
    with _lock:
        entry = _kept.get(key)
    if entry and entry[0]() is weight and entry[1] == source:
        return entry[2]
    if entry:  # the layer's weights or scales were replaced or edited: computed again
        _forget(key)
    with _lock:
        if _kept_bytes + weight.numel() * 4 > keep_bytes:
            return None
    full = dequantize_weight(weight, scale_inv, block_size)
    with _lock:
        _kept[key] = (weakref.ref(weight, lambda _: _forget(key)), source, full)
        _kept_bytes += full.nbytes
    return full


def float_weights(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """The layer's weights in float32: the kept copy where there is one, computed for this call otherwise."""
    kept = kept_float(weight, scale_inv, block_size)
    return kept if kept is not None else dequantize_weight(weight, scale_inv, block_size)


def _product(input, weights: torch.Tensor, block_size, activation_scale=None) -> torch.Tensor:
    block_k = block_size[1] if block_size is not None else input.shape[-1]
    return quantize_activations(input, block_k, activation_scale) @ weights.T


def matmul_2d(input, weight, weight_scale_inv, block_size, output_dtype=None, activation_scale=None):
    """input (..., K) @ weight (N, K).T, as `matmul_2d` of the Hub kernel."""
    if blockwise_runs(input, weight, weight_scale_inv, block_size, activation_scale, output_dtype):
        return blockwise_matmul(input, weight, weight_scale_inv, output_dtype or input.dtype)
    out = _product(input, float_weights(weight, weight_scale_inv, block_size), block_size, activation_scale)
    return out.to(output_dtype or input.dtype)


# Whether torch's block-scaled FP8 matmul computes right in this process: None until a model's FP8 layers are loaded
# onto a GPU (use_blockwise), so a process that only plans or launches never touches CUDA for it.
_blockwise: bool | None = None
_scaled_mm_ran = False  # set where the op ran: the record names the kernel that ran, not the one that might have


def blockwise_runs(input, weight, weight_scale_inv, block_size, activation_scale, output_dtype) -> bool:
    """Whether this call can run on the block-scaled matmul: a GPU tensor, dynamic activations, 128x128 blocks."""
    return (bool(_blockwise) and input.is_cuda and activation_scale is None and block_size is not None
            and tuple(block_size) == (128, 128) and fits_blockwise(weight, weight_scale_inv, output_dtype or input.dtype))


def fits_blockwise(weight, weight_scale_inv, output_dtype) -> bool:
    """Blocks that divide the layer (a checkpoint made elsewhere may have ragged edges), e4m3 weights, float32 scales
    (not UE8M0), and a 16- or 32-bit output as the probe checked."""
    n, k = weight.shape
    return (weight.dtype == torch.float8_e4m3fn and n % 128 == 0 and k % 128 == 0
            and weight_scale_inv.dtype == torch.float32 and tuple(weight_scale_inv.shape) == (n // 128, k // 128)
            and output_dtype in (torch.bfloat16, torch.float32))


def weight_scales(scale_inv: torch.Tensor) -> torch.Tensor:
    """(N/128, K/128) scales as scaled_mm's scale_b: each row padded to 4 blocks (16 bytes), transposed. A layer's
    scales laid out so at load (lay_out_scales) are read in place; others are padded at each call."""
    rows, cols = scale_inv.shape
    width = cols + -cols % 4
    held = scale_inv.untyped_storage().nbytes() // scale_inv.element_size() - scale_inv.storage_offset()
    if scale_inv.stride() == (width, 1) and held >= rows * width:  # its rows' padding is there to read
        return scale_inv.as_strided((rows, width), (width, 1)).t()
    return torch.nn.functional.pad(scale_inv, (0, width - cols)).t()


def blockwise_matmul(input, weight, weight_scale_inv, output_dtype) -> torch.Tensor:
    x = input.reshape(-1, input.shape[-1])
    codes, scales = activation_blocks(x)  # left to torch.compile, which fuses them with what comes before
    out = scaled_blocks_mm(codes, scales, weight, weight_scale_inv, output_dtype)
    return out.reshape(*input.shape[:-1], weight.shape[0])


def four_rows(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes with rows of zeros to a multiple of 4, and their scales with strides (1, rows), as cuBLAS takes them:
    from 4 rows up (torch 2.11, CUDA 13), the scales outer-dim-major. Padding rows' scales are left unset: their
    products are dropped."""
    rows, blocks = scales.shape
    padded = rows + -rows % 4
    if padded != rows:
        codes = torch.nn.functional.pad(codes.view(torch.uint8), (0, 0, 0, padded - rows)).view(codes.dtype)
    if padded != rows or scales.stride() != (1, rows):
        laid = torch.empty_strided((padded, blocks), (1, padded), dtype=scales.dtype, device=scales.device)
        laid[:rows].copy_(scales)
        scales = laid
    return codes, scales


def scaled_blocks_product(codes, scales, weight, weight_scale_inv, out_dtype) -> torch.Tensor:
    from torch.nn.functional import ScalingType, scaled_mm

    rows = codes.shape[0]
    codes, scales = four_rows(codes, scales)
    return scaled_mm(codes, weight.t(), scales, ScalingType.BlockWise1x128, weight_scales(weight_scale_inv),
                     ScalingType.BlockWise128x128, output_dtype=out_dtype)[:rows]


# An op of its own: torch.compile keeps the scales' strides as cuBLAS wants them, and Inductor's Triton code
# generation failed on the rows' padding and transposed scales traced with the activations' quantization.
@torch.library.custom_op("quantgate::scaled_blocks_mm", mutates_args=())
def scaled_blocks_mm(codes: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    global _scaled_mm_ran
    _scaled_mm_ran = True
    return scaled_blocks_product(codes, scales, weight, weight_scale_inv, out_dtype)


@scaled_blocks_mm.register_fake
def _(codes, scales, weight, weight_scale_inv, out_dtype):
    return codes.new_empty(codes.shape[0], weight.shape[0], dtype=out_dtype)


def blockwise_probe(device: torch.device) -> bool:
    """Whether torch's block-scaled FP8 matmul runs and computes right here: it needs a Hopper GPU, cuBLAS 12.9 and
    torch's `scaled_mm` (2.10 on). torch 2.11's older `_scaled_mm` takes 30 K blocks' scales but reads them 32 apart,
    a wrong product without an error: the probe has 3 K blocks, each scale its own, checked against the exact one."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False
    generator = torch.Generator(device).manual_seed(0)
    codes = torch.randn(4, 384, device=device, generator=generator).clamp(-8, 8).to(torch.float8_e4m3fn)
    weight = torch.randn(256, 384, device=device, generator=generator).clamp(-8, 8).to(torch.float8_e4m3fn)
    scales, scale_inv = (torch.rand(shape, device=device, generator=generator) + 0.5 for shape in ((4, 3), (2, 3)))
    exact = (dequantize_weight(codes, scales, (1, 128)) @ dequantize_weight(weight, scale_inv, (128, 128)).T)
    try:
        out = scaled_blocks_product(codes, scales, weight, scale_inv, torch.float32)
    except (RuntimeError, ImportError, ValueError):  # no such op in this torch, or not on this GPU and cuBLAS
        return False
    return bool(((out - exact).norm() / exact.norm()) < 1e-3)


def probe(device: torch.device) -> bool:
    """blockwise_probe's answer, asked once a process."""
    global _blockwise
    with _lock:
        if _blockwise is None:
            _blockwise = blockwise_probe(device)
        return _blockwise


def use_blockwise(model: torch.nn.Module, lay_out: bool) -> None:
    """Probes, once a process, whether the block-scaled matmul runs on the GPU the model's FP8 layers sit on; where it
    does and `lay_out`, lays their scales out for it (a model loaded to compute, never one about to be saved)."""
    global _scaled_mm_ran
    _scaled_mm_ran = False  # the record names what this model's layers ran on, not an earlier model's
    devices = {m.weight.device for m in model.modules() if getattr(m, "weight_scale_inv", None) is not None
               and getattr(m, "weight", None) is not None and m.weight.device.type == "cuda"}
    if not devices or install() != REFERENCE:  # the Hub's kernel serves them: its scales as they are
        return
    if probe(min(devices, key=str)) and lay_out:
        lay_out_scales(model)


def lay_out_scales(model: torch.nn.Module) -> int:
    """Each 128x128 layer's scales laid out once as the block-scaled matmul reads them (rows padded to 4 blocks), so
    no call pads them; values and shape as they were. Only for a model loaded to compute, never one about to be
    saved. Layers changed."""
    changed = 0
    for module in model.modules() if _blockwise else ():
        scales, weight = getattr(module, "weight_scale_inv", None), getattr(module, "weight", None)
        if scales is None or weight is None or scales.dim() != 2 or \
                tuple(getattr(module, "block_size", None) or ()) != (128, 128):
            continue
        laid_out = weight_scales(scales.data).t()[:, :scales.shape[1]]
        if laid_out.data_ptr() != scales.data_ptr():
            scales.data, changed = laid_out, changed + 1
    return changed


def _expert(weight, weight_scale_inv, block_size, expert: int, kept) -> torch.Tensor:
    """One expert's float32 weights: a slice of the kept copy of them all, or that expert's alone."""
    return kept[expert] if kept is not None else dequantize_weight(weight[expert], weight_scale_inv[expert], block_size)


def matmul_batched(input, weight, weight_scale_inv, block_size, expert_ids):
    """Row s of input (S, K) times expert expert_ids[s] of weight (E, N, K); rows routed past E stay zero."""
    out = input.new_zeros(input.shape[0], weight.shape[1])
    kept = kept_float(weight, weight_scale_inv, block_size)
    for expert in expert_ids.unique().tolist():
        if expert >= weight.shape[0]:
            continue
        rows = expert_ids == expert
        out[rows] = _product(input[rows], _expert(weight, weight_scale_inv, block_size, expert, kept),
                             block_size).to(input.dtype)
    return out


def matmul_grouped(input, weight, weight_scale_inv, offsets, tokens_per_expert, block_size):
    """Rows of input (S, K) sorted by expert, expert e's ending at offsets[e]; rows past the last stay zero."""
    out = input.new_zeros(input.shape[0], weight.shape[1])
    kept = kept_float(weight, weight_scale_inv, block_size)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = _product(input[start:end], _expert(weight, weight_scale_inv, block_size, expert, kept),
                                      block_size).to(input.dtype)
        start = end
    return out


def install() -> str:
    """Which kernel transformers' FineGrainedFP8 layers will call in this process: the Hub kernel where
    the `kernels` package provides it, else this module, installed here."""
    from transformers.integrations import finegrained_fp8, hub_kernels
    from transformers.utils import is_kernels_available

    current = finegrained_fp8._FINEGRAINED_FP8
    if current is not None:
        return REFERENCE if current.matmul is matmul_2d else HUB
    if is_kernels_available():
        try:
            finegrained_fp8.load_finegrained_fp8_kernel()
            return HUB
        except Exception:  # offline, no build for this torch or device: the reference stands in
            pass
    hub_kernels._KERNEL_MODULE_MAPPING["finegrained-fp8"] = sys.modules[__name__]
    finegrained_fp8._FINEGRAINED_FP8 = finegrained_fp8.FineGrainedFP8(
        matmul=matmul_2d, batched_matmul=matmul_batched, grouped_matmul=matmul_grouped)
    return REFERENCE


def kernel_for(installed: str, block_size) -> str:
    """The kernel this process's layers of these blocks ran on, `installed` the one install() put in: the Hub's, or
    torch's block-scaled matmul where it ran (128x128 blocks on a Hopper GPU), else the reference."""
    if installed == HUB:
        return HUB
    return SCALED_MM if _scaled_mm_ran and tuple(block_size) == (128, 128) else REFERENCE
