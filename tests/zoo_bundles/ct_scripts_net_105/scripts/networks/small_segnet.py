"""``SmallSegNet``: a two-level 3D encoder-decoder with a skip connection (test bundle network)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01))


class SmallSegNet(nn.Module):
    """Encoder (two strided stages), decoder (transposed convolutions, concatenated skips), 1x1x1 head."""

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int] = (8, 16, 24)) -> None:
        super().__init__()
        f0, f1, f2 = (int(f) for f in features)
        self.enc0 = _block(in_channels, f0)
        self.down1 = nn.Sequential(nn.Conv3d(f0, f1, 2, stride=2), _block(f1, f1))
        self.down2 = nn.Sequential(nn.Conv3d(f1, f2, 2, stride=2), _block(f2, f2))
        self.up1 = nn.ConvTranspose3d(f2, f1, 2, stride=2)
        self.dec1 = _block(2 * f1, f1)
        self.up0 = nn.ConvTranspose3d(f1, f0, 2, stride=2)
        self.dec0 = _block(2 * f0, f0)
        self.head = nn.Conv3d(f0, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        d1 = self.dec1(torch.cat([self.up1(e2), e1], dim=1))
        d0 = self.dec0(torch.cat([self.up0(d1), e0], dim=1))
        return self.head(d0)
