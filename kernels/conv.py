"""Convolution paths other than the plain torch op.

CPU: oneDNN's direct 3×3 convolution is slow when there are few output pixels (the SD UNet's 16×16 and 8×8
levels); there, gathering NHWC patches and doing one GEMM is faster (1.1–1.8× in bench/results/conv_cpu.json).
"""
import torch
import torch.nn.functional as F

IM2COL_MAX_PIXELS = 512  # batch × H × W; above it (measured at 2048) oneDNN wins


def im2col_applies(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    pixels = x.shape[0] * ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1)
    return (x.device.type == "cpu" and weight.shape[2:] == (3, 3) and stride in (1, 2) and padding == 1
            and pixels <= IM2COL_MAX_PIXELS)


def im2col_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1) -> torch.Tensor:
    """3×3, padding 1 convolution as (B·H'·W', 9·C) patches @ (9·C, O); returns a channels-last tensor."""
    b, c = x.shape[:2]
    h, w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
    patches = [xp[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
               for i in range(3) for j in range(3)]
    cols = torch.cat(patches, dim=-1).reshape(-1, 9 * c)
    wm = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * c)  # (O, kh, kw, C): matches the patch order
    out = cols @ wm.t() if bias is None else torch.addmm(bias, cols, wm.t())
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)
