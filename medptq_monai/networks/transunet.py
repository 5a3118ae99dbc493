"""3D TransUNet: a convolutional encoder, a ViT bottleneck on the 1/16 token grid, a
transposed-convolution decoder with skip connections.

Layout (defaults, 96³ input, ``base_channels`` b = 16, as in the MedPTQ reference's
released TransUNet):

* encoder: five stages of two ``Conv3d(3x3x3) - BatchNorm3d - ReLU``; the first keeps
  the resolution, the next four halve it with a stride-2 first convolution; widths
  b, 2b, 4b, 8b, 16b (96³ → 48³ → 24³ → 12³ → 6³);
* tokens: a 1x1x1 convolution 16b → ``hidden_size`` on the 6³ grid, flattened to
  216 tokens plus a learned position embedding;
* ``num_layers`` transformer layers (multi-head self-attention + GELU MLP, LayerNorm),
  pre-norm by default with a final LayerNorm (``norm_first=False`` gives the post-norm
  layout of ``torch.nn.TransformerEncoderLayer`` that the MedPTQ reference uses, with no
  final norm; both have the same parameters apart from that final norm);
* decoder: four ``ConvTranspose3d(2, stride 2)`` upsamplings, each followed by
  concatenation with the encoder feature of the same resolution and a two-convolution
  stage; a 1x1x1 convolution head to ``out_channels``.

Attention is written with plain ops (``q @ k^T * scale``, softmax, ``@ v``), so the ONNX
graph holds MatMul/Softmax nodes rather than a fused attention kernel; every reshape
keeps the batch axis free (``-1``), so an export traced at batch 1 runs at any batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MultiHeadSelfAttention", "TransformerMlp", "TransformerLayer", "TransUNet3D"]


def _is_exporting() -> bool:
    """True while torch.jit tracing or ONNX export runs (shape checks are skipped then)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_dropout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_img_size(img_size: Sequence[int] | int, divisor: int, why: str) -> tuple[int, int, int]:
    """Normalise ``img_size`` to three positive ints, each divisible by ``divisor``."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size,) * 3
    try:
        size = tuple(img_size)
    except TypeError:
        raise ValueError(f"img_size must be an int or a sequence of 3 ints, got {img_size!r}") from None
    if len(size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"img_size must be 3 positive ints (D, H, W), got {img_size!r}")
    bad = [s for s in size if s % divisor]
    if bad:
        raise ValueError(f"img_size {size} must be divisible by {divisor} along every axis ({why}); {bad} are not")
    return size  # type: ignore[return-value]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention on ``[B, N, C]`` tokens with explicit MatMul/Softmax ops.

    ``seq_len`` (N), when known, is used as a constant in the reshapes so the exported
    graph needs no Shape ops; otherwise N is read from the input's shape.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, dropout: float = 0.0, seq_len: int | None = None
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.seq_len = seq_len
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, C] → [B, N, C]."""
        n = self.seq_len if self.seq_len is not None else x.shape[1]
        # [B, N, 3C] → [3, B, heads, N, head_dim]; the batch axis stays -1 for dynamic batch
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(attn, dim=-1)
        out = torch.matmul(attn, v)  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).reshape(-1, n, self.dim)
        return self.proj_drop(self.proj(out))


class TransformerMlp(nn.Module):
    """Two linear layers with GELU in between (the transformer feed-forward block)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class TransformerLayer(nn.Module):
    """One transformer layer: self-attention and MLP, each with a residual and a LayerNorm.

    ``norm_first=True`` (pre-norm): ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.
    ``norm_first=False`` (post-norm): ``ln1(x + attn(x))``, then ``ln2(x + mlp(x))``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        norm_first: bool = True,
        seq_len: int | None = None,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias=qkv_bias, dropout=dropout, seq_len=seq_len)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = TransformerMlp(dim, mlp_dim, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, C] → [B, N, C]."""
        if self.norm_first:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


def init_transformer_weights(module: nn.Module) -> None:
    """ViT-style init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _ConvStage(nn.Sequential):
    """Two ``Conv3d(3) - BatchNorm3d - ReLU``; the first convolution carries the stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


def check_volume_input(x: torch.Tensor, in_channels: int, img_size: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``x`` is ``[N, in_channels, *img_size]`` (the position embeddings fix the size)."""
    if x.ndim != 5 or x.shape[1] != in_channels or tuple(x.shape[2:]) != tuple(img_size):
        raise ValueError(f"expected input [N, {in_channels}, {', '.join(map(str, img_size))}], got {list(x.shape)}")


class TransUNet3D(nn.Module):
    """3D TransUNet (conv encoder → transformer on the 1/16 grid → ConvTranspose decoder).

    Args:
        in_channels: input image channels.
        out_channels: output classes (logit channels).
        img_size: training/inference patch size (D, H, W); each axis divisible by 16.
            The position embedding is sized for it, so inputs must have this size.
        base_channels: width of the first encoder stage (doubles per stage, 5 stages).
        hidden_size: transformer width.
        num_layers: number of transformer layers.
        num_heads: attention heads (must divide ``hidden_size``).
        mlp_dim: hidden width of the transformer MLP.
        dropout: dropout rate in the transformer (attention output, MLP, embeddings).
        norm_first: pre-norm layers plus a final LayerNorm (default) or post-norm layers.

    ``forward(x[N, in_channels, D, H, W]) → logits[N, out_channels, D, H, W]``.
    """

    DOWNSAMPLE = 16

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        img_size: Sequence[int] | int = (96, 96, 96),
        base_channels: int = 16,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.0,
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("base_channels", base_channels),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
        ):
            _check_positive_int(name, value)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        dropout = _check_dropout(dropout)
        self.img_size = _check_img_size(img_size, self.DOWNSAMPLE, "the encoder downsamples 16x to the token grid")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_size = hidden_size
        self.grid_size = tuple(s // self.DOWNSAMPLE for s in self.img_size)
        self.num_tokens = math.prod(self.grid_size)

        b = base_channels
        self.enc1 = _ConvStage(in_channels, b)
        self.enc2 = _ConvStage(b, 2 * b, stride=2)
        self.enc3 = _ConvStage(2 * b, 4 * b, stride=2)
        self.enc4 = _ConvStage(4 * b, 8 * b, stride=2)
        self.enc5 = _ConvStage(8 * b, 16 * b, stride=2)

        self.token_proj = nn.Conv3d(16 * b, hidden_size, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size))
        self.pos_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                hidden_size, num_heads, mlp_dim, dropout=dropout, norm_first=norm_first, seq_len=self.num_tokens
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size) if norm_first else nn.Identity()

        self.up4 = nn.ConvTranspose3d(hidden_size, 8 * b, kernel_size=2, stride=2)
        self.dec4 = _ConvStage(16 * b, 8 * b)
        self.up3 = nn.ConvTranspose3d(8 * b, 4 * b, kernel_size=2, stride=2)
        self.dec3 = _ConvStage(8 * b, 4 * b)
        self.up2 = nn.ConvTranspose3d(4 * b, 2 * b, kernel_size=2, stride=2)
        self.dec2 = _ConvStage(4 * b, 2 * b)
        self.up1 = nn.ConvTranspose3d(2 * b, b, kernel_size=2, stride=2)
        self.dec1 = _ConvStage(2 * b, b)
        self.head = nn.Conv3d(b, out_channels, kernel_size=1)

        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        self.layers.apply(init_transformer_weights)
        self.norm.apply(init_transformer_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [N, C_in, D, H, W] (D, H, W = ``img_size``) → logits [N, C_out, D, H, W]."""
        if not _is_exporting():
            check_volume_input(x, self.in_channels, self.img_size)
        c1 = self.enc1(x)
        c2 = self.enc2(c1)
        c3 = self.enc3(c2)
        c4 = self.enc4(c3)
        c5 = self.enc5(c4)

        tokens = self.token_proj(c5).reshape(-1, self.hidden_size, self.num_tokens).transpose(1, 2)  # [N, T, C]
        tokens = self.pos_drop(tokens + self.pos_embed)
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = self.norm(tokens)
        feat = tokens.transpose(1, 2).reshape(-1, self.hidden_size, *self.grid_size)

        d4 = self.dec4(torch.cat((self.up4(feat), c4), dim=1))
        d3 = self.dec3(torch.cat((self.up3(d4), c3), dim=1))
        d2 = self.dec2(torch.cat((self.up2(d3), c2), dim=1))
        d1 = self.dec1(torch.cat((self.up1(d2), c1), dim=1))
        return self.head(d1)
