"""UNesT: hierarchical nested-transformer encoder + UNETR-style convolutional decoder.

After Yu et al., "UNesT: local spatial representation learning with hierarchical
transformer for efficient medical segmentation" (Med. Image Anal. 2023), built to match
the network of MONAI's ``wholeBrainSeg_Large_UNEST_segmentation`` bundle (133 classes,
patch 4, depths (2, 2, 8), embed dims (128, 256, 512), heads (4, 8, 16), roi 96³).

Design, with the 96³ default in brackets:

* patch embedding: ``Conv3d(kernel = stride = patch_size)`` to ``embed_dim[0]``
  channels [24³ grid of 128-d tokens], no norm;
* three hierarchy levels.  Level ``i`` splits its feature grid into non-overlapping
  blocks, ``4³, 2³, 1³`` blocks at levels 0, 1, 2 (64, 8, 1 blocks), so every block has
  the same size [6³ = 216 tokens].  Each level adds a learned position embedding of
  shape ``[1, blocks, tokens per block, dim]`` and runs ``depths[i]`` pre-norm
  transformer layers (MSA + GELU MLP ratio 4, LayerNorm eps 1e-6, qkv bias) inside
  each block independently (blocks are folded into the batch axis);
* block aggregation before levels 1 and 2: ``Conv3d(3x3x3)`` to the new width,
  LayerNorm over channels, ``MaxPool3d(3, stride 2, padding 1)`` [24³ → 12³ → 6³];
* a final LayerNorm on the last level's output;
* decoder, with ``f = feature_size`` [16] and the MONAI blocks of UNETR
  (``UnetrBasicBlock`` / ``UnetrUpBlock`` with residual units and instance norm):
  skips are a residual conv block on the input (2f, full res), the patch embedding
  upsampled 2x by a transposed convolution followed by a 1x1x1 transposed
  convolution (4f, 1/2), residual conv blocks on the level-0 (8f, 1/4) and level-1
  (16f, 1/8) outputs, and the raw level-2 output (``embed_dim[2]``, 1/16).  The
  normed level-2 output goes through a stride-2 ``Convolution`` (conv → PReLU →
  instance norm) to ``2 * embed_dim[2]`` channels [3³]; five ``UnetrUpBlock`` bring it
  back to full resolution (widths ``embed_dim[2]``, 16f, 8f, 4f, 2f) and a 1x1x1
  convolution gives the logits.

Submodule names follow the bundle's (``nestViT``, ``encoder1..4``, ``encoder10``,
``decoder1..5``, ``out``) so that its ``model.pt`` state dict should load with
``strict=True`` (checked against the bundle's source layout, not against the weight file
itself).  Differences from the bundle code: stochastic depth (drop path 0.5 in the
bundle) is left out as it is identity at inference; non-cubic ``img_size`` is allowed
(4 blocks per axis at level 0); ``patch_size`` must be 4, the only value for which the
bundle's decoder (one upsampled patch-embedding skip at 1/2 resolution) is consistent.

``img_size`` constraints: every axis divisible by ``32 = patch 4 x 4 blocks x 2`` (the
level-0 grid splits into 4 blocks per axis and the level-2 grid must be even for the
stride-2 bottleneck and its transposed-convolution upsampling), and the 1/32 bottleneck
must hold more than one voxel (instance norm); 32³ is therefore too small, while
(32, 32, 64), 64³ and 96³ work.

Attention uses plain ops (MatMul/Softmax in ONNX) and all reshapes keep the batch axis
free, so an ONNX export traced at batch 1 runs at any batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from .transunet import (
    TransformerLayer,
    check_volume_input,
    _check_dropout,
    _check_img_size,
    _check_positive_int,
    _is_exporting,
    init_transformer_weights,
)

__all__ = ["UNesT", "blockify", "deblockify"]

_NUM_LEVELS = 3
_LN_EPS = 1e-6


def blockify(
    x: torch.Tensor, blocks: Sequence[int], block_size: Sequence[int], channels: int | None = None
) -> torch.Tensor:
    """Channels-first grid ``[B, C, D, H, W]`` → blocks ``[B, T, N, C]``.

    ``blocks`` is the number of blocks per axis, ``block_size`` the tokens per axis in a
    block; blocks (T) and the tokens inside a block (N) are both ordered D, H, W.
    ``channels`` (C), when given, is used as a constant (no Shape ops in an export).
    """
    nd, nh, nw = blocks
    bd, bh, bw = block_size
    c = channels if channels is not None else x.shape[1]
    x = x.reshape(-1, c, nd, bd, nh, bh, nw, bw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, nd, nh, nw, bd, bh, bw, C]
    return x.reshape(-1, nd * nh * nw, bd * bh * bw, c)


def deblockify(
    x: torch.Tensor, blocks: Sequence[int], block_size: Sequence[int], channels: int | None = None
) -> torch.Tensor:
    """Inverse of :func:`blockify`: ``[B, T, N, C]`` → ``[B, C, D, H, W]``."""
    nd, nh, nw = blocks
    bd, bh, bw = block_size
    c = channels if channels is not None else x.shape[-1]
    x = x.reshape(-1, nd, nh, nw, bd, bh, bw, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, nd, bd, nh, bh, nw, bw]
    return x.reshape(-1, c, nd * bd, nh * bh, nw * bw)


class _PatchEmbed(nn.Module):
    """Non-overlapping patch projection (``Conv3d`` with kernel = stride = patch size)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _BlockAggregation(nn.Module):
    """Conv3d(3) → LayerNorm over channels → MaxPool3d(3, stride 2): halves the grid."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_dim, out_dim, kernel_size=3, padding=1, bias=True)
        self.norm = nn.LayerNorm(out_dim, eps=_LN_EPS)
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return self.pool(x)


class _NestLevel(nn.Module):
    """One hierarchy level: optional block aggregation, then transformer layers per block."""

    def __init__(
        self,
        blocks: tuple[int, int, int],
        block_size: tuple[int, int, int],
        dim: int,
        depth: int,
        num_heads: int,
        prev_dim: int | None,
        dropout: float,
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.block_size = block_size
        self.num_blocks = math.prod(blocks)
        self.seq_len = math.prod(block_size)
        self.dim = dim
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_blocks, self.seq_len, dim))
        self.pool: nn.Module = nn.Identity() if prev_dim is None else _BlockAggregation(prev_dim, dim)
        self.transformer_encoder = nn.Sequential(
            *(
                TransformerLayer(
                    dim, num_heads, 4 * dim, dropout=dropout, norm_eps=_LN_EPS, norm_first=True, seq_len=self.seq_len
                )
                for _ in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, C_prev, D, H, W] → [B, C, D', H', W'] (D' = D/2 after aggregation)."""
        x = self.pool(x)
        x = blockify(x, self.blocks, self.block_size, self.dim) + self.pos_embed  # [B, T, N, C]
        # attention stays inside each block: fold the blocks into the batch axis
        x = self.transformer_encoder(x.reshape(-1, self.seq_len, self.dim))
        x = x.reshape(-1, self.num_blocks, self.seq_len, self.dim)
        return deblockify(x, self.blocks, self.block_size, self.dim)


class _NestEncoder(nn.Module):
    """Patch embedding + three nested levels + final LayerNorm."""

    def __init__(
        self,
        in_channels: int,
        img_size: tuple[int, int, int],
        patch_size: int,
        embed_dim: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(in_channels, embed_dim[0], patch_size)
        grid = tuple(s // patch_size for s in img_size)
        top_blocks = 2 ** (_NUM_LEVELS - 1)  # 4 blocks per axis at level 0
        block_size = tuple(g // top_blocks for g in grid)
        levels = []
        for i in range(_NUM_LEVELS):
            per_axis = top_blocks // 2**i
            levels.append(
                _NestLevel(
                    blocks=(per_axis,) * 3,
                    block_size=block_size,  # type: ignore[arg-type]
                    dim=embed_dim[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    prev_dim=None if i == 0 else embed_dim[i - 1],
                    dropout=dropout,
                )
            )
        self.levels = nn.ModuleList(levels)
        self.norm = nn.LayerNorm(embed_dim[-1], eps=_LN_EPS)
        for level in self.levels:
            nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-2.0, b=2.0)
        self.apply(init_transformer_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the normed last level and [patch embedding, level 0, level 1, level 2]."""
        x = self.patch_embed(x)
        hidden = [x]
        for level in self.levels:
            x = level(x)
            hidden.append(x)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return x, hidden


def _check_triple(name: str, value: Sequence[int]) -> tuple[int, int, int]:
    try:
        triple = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {_NUM_LEVELS} positive ints, got {value!r}") from None
    if len(triple) != _NUM_LEVELS:
        raise ValueError(f"{name} must have {_NUM_LEVELS} entries (one per hierarchy level), got {value!r}")
    for v in triple:
        _check_positive_int(f"every entry of {name}", v)
    return triple  # type: ignore[return-value]


class UNesT(nn.Module):
    """UNesT segmentation network (nested hierarchical transformer + conv decoder).

    Args:
        in_channels: input image channels.
        out_channels: output classes (logit channels).
        img_size: patch size (D, H, W) the position embeddings are built for; every axis
            divisible by 32 and not 32³ (see the module docstring).
        patch_size: patch-embedding size; must be 4 (the bundle's decoder assumes it).
        embed_dim: transformer width of the three hierarchy levels.
        depths: transformer layers per level.
        num_heads: attention heads per level (each must divide its ``embed_dim``).
        feature_size: decoder base width f (skips/decoder widths 2f, 4f, 8f, 16f).
        dropout: dropout rate in the transformer layers.

    ``forward(x[N, in_channels, D, H, W]) → logits[N, out_channels, D, H, W]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 133,
        img_size: Sequence[int] | int = (96, 96, 96),
        patch_size: int = 4,
        embed_dim: Sequence[int] = (128, 256, 512),
        depths: Sequence[int] = (2, 2, 8),
        num_heads: Sequence[int] = (4, 8, 16),
        feature_size: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("feature_size", feature_size)
        _check_positive_int("patch_size", patch_size)
        if patch_size != 4:
            raise ValueError(
                f"patch_size must be 4 (the decoder has one upsampled patch-embedding skip at 1/2 "
                f"resolution, as in the UNesT bundle), got {patch_size}"
            )
        embed_dim = _check_triple("embed_dim", embed_dim)
        depths = _check_triple("depths", depths)
        num_heads = _check_triple("num_heads", num_heads)
        for i, (dim, heads) in enumerate(zip(embed_dim, num_heads)):
            if dim % heads:
                raise ValueError(f"embed_dim[{i}]={dim} must be divisible by num_heads[{i}]={heads}")
        dropout = _check_dropout(dropout)
        divisor = patch_size * 2 ** (_NUM_LEVELS - 1) * 2
        self.img_size = _check_img_size(
            img_size, divisor, f"patch {patch_size} x 4 blocks per axis x an even level-2 grid"
        )
        if math.prod(s // divisor for s in self.img_size) < 2:
            raise ValueError(
                f"img_size {self.img_size} is too small: the 1/{divisor} bottleneck would be a single voxel, "
                "which instance norm cannot normalise; use e.g. (32, 32, 64) or 64³"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.embed_dim = embed_dim

        f = feature_size
        e0, e1, e2 = embed_dim
        norm = "instance"
        self.nestViT = _NestEncoder(in_channels, self.img_size, patch_size, embed_dim, depths, num_heads, dropout)
        # skips
        self.encoder1 = UnetrBasicBlock(3, in_channels, 2 * f, kernel_size=3, stride=1, norm_name=norm, res_block=True)
        self.encoder2 = UnetrPrUpBlock(
            3, e0, 4 * f, num_layer=0, kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm
        )
        # the bundle's patch-embedding skip ends with a bias-free 1x1x1 transposed convolution
        self.encoder2.blocks.append(
            get_conv_layer(3, 4 * f, 4 * f, kernel_size=1, stride=1, conv_only=True, is_transposed=True)
        )
        self.encoder3 = UnetrBasicBlock(3, e0, 8 * f, kernel_size=3, stride=1, norm_name=norm, res_block=True)
        self.encoder4 = UnetrBasicBlock(3, e1, 16 * f, kernel_size=3, stride=1, norm_name=norm, res_block=True)
        # bottleneck: conv (stride 2) → PReLU → dropout(0) → instance norm
        self.encoder10 = Convolution(3, e2, 2 * e2, strides=2, adn_ordering="ADN", dropout=0.0)
        # decoder
        up = {"kernel_size": 3, "upsample_kernel_size": 2, "norm_name": norm, "res_block": True}
        self.decoder5 = UnetrUpBlock(3, 2 * e2, e2, **up)
        self.decoder4 = UnetrUpBlock(3, e2, 16 * f, **up)
        self.decoder3 = UnetrUpBlock(3, 16 * f, 8 * f, **up)
        self.decoder2 = UnetrUpBlock(3, 8 * f, 4 * f, **up)
        self.decoder1 = UnetrUpBlock(3, 4 * f, 2 * f, **up)
        self.out = UnetOutBlock(3, 2 * f, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [N, C_in, D, H, W] (D, H, W = ``img_size``) → logits [N, C_out, D, H, W]."""
        if not _is_exporting():
            check_volume_input(x, self.in_channels, self.img_size)
        top, hidden = self.nestViT(x)
        enc0 = self.encoder1(x)  # 2f, 1/1
        enc1 = self.encoder2(hidden[0])  # 4f, 1/2 (from the patch embedding)
        enc2 = self.encoder3(hidden[1])  # 8f, 1/4 (level 0)
        enc3 = self.encoder4(hidden[2])  # 16f, 1/8 (level 1)
        enc4 = hidden[3]  # embed_dim[2], 1/16 (level 2)
        dec = self.encoder10(top)  # 2 * embed_dim[2], 1/32
        dec = self.decoder5(dec, enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        dec = self.decoder1(dec, enc0)
        return self.out(dec)
