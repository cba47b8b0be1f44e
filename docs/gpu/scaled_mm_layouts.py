"""Which block-scaled layouts this torch's _scaled_mm takes and computes right, printed one line each: a probe for
quantgate.backends.fp8_kernel, whose scale layouts differ between torch releases. Every K block's scale differs, so a
layout read with the wrong row stride gives a wrong product, not only a refused one."""
import itertools

import torch


def attempt(m: int, k: int, n: int, a_stride, b_pad: bool, api: str):
    kb, nb = k // 128, n // 128
    torch.manual_seed(0)
    codes = torch.randn(m, k, device="cuda").clamp(-8, 8).to(torch.float8_e4m3fn)
    weight = torch.randn(n, k, device="cuda").clamp(-8, 8).to(torch.float8_e4m3fn)
    sa = torch.empty_strided((m, kb), a_stride(m, kb), device="cuda")
    sa.copy_(torch.rand(m, kb, device="cuda") + 0.5)
    b_scales = torch.rand(nb, kb, device="cuda") + 0.5
    width = kb + (-kb % 4 if b_pad else 0)
    sb = torch.nn.functional.pad(b_scales, (0, width - kb))[:, :kb].t()
    exact = (codes.float().unflatten(1, (kb, 128)) * sa[:, :, None]).flatten(1) @ \
        (weight.float().unflatten(1, (kb, 128)).unflatten(0, (nb, 128)) * b_scales[:, None, :, None]).flatten(2).flatten(0, 1).T
    try:
        if api == "v1":
            out = torch._scaled_mm(codes, weight.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        else:
            from torch.nn.functional import ScalingType, scaled_mm
            full = torch.nn.functional.pad(b_scales, (0, width - kb)).t()  # v2 takes the padded rows whole
            out = scaled_mm(codes, weight.t(), sa, ScalingType.BlockWise1x128, full, ScalingType.BlockWise128x128,
                            output_dtype=torch.float32)
    except (RuntimeError, ImportError, TypeError, ValueError) as e:
        return "refused: " + str(e).splitlines()[0][:50]
    error = ((out - exact).norm() / exact.norm()).item()
    return f"{'ok' if error < 1e-3 else 'WRONG'} {error:.2e}"


strides = {"outer(1,M)": lambda m, kb: (1, m), "contig(KB,1)": lambda m, kb: (kb, 1)}
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
for api, m, k, (name, stride), pad in itertools.product(("v2", "v1"), (1, 4, 16), (384, 512, 3840, 4096),
                                                          strides.items(), (True, False)):
    print(api, m, k, name, "b_pad" if pad else "b_plain", attempt(m, k, 256, stride, pad, api), flush=True)
