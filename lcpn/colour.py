"""``ColourHistogram``: the product's colour, measured on the network's own input.

ImageNet features are trained to see a red shoe and a black shoe as the same shoe, so a head on
them guesses colours poorly (the catalogue's baseColour: 60% with the backbone's embedding alone,
65% with this histogram beside it, docs/benchmarks.md). The histogram is read off the same input
square the backbone sees: pixels are softly assigned to a grid of RGB colours and averaged over
the product, leaving out the near-white studio background. It is made of plain tensor operations, so
it runs on any device and exports to ONNX with the backbone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VERSION = 2  # bump when the histogram's numbers change: embedding stores are keyed on it
LEVELS = 5  # grid points per channel: 125 colours
# The input is averaged down to about this many pixels a side first (cost, and JPEG noise). 64 made the
# histogram 9% of a Lite2 cascade's prediction time on a 2-core CPU; 32 costs too little to measure there.
GRID_SIDE = 32
BACKGROUND = 0.92  # a pixel whose every channel is above this is studio background
SIGMA = 0.5 / (LEVELS - 1)  # soft assignment: half a grid step


class ColourHistogram(nn.Module):
    """Normalised input (B, 3, H, W) -> (B, LEVELS**3 + 4): the share of the product's pixels near each
    grid colour, the product's mean colour, and the share of the picture the product covers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        axis = torch.linspace(0, 1, LEVELS)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
        self.register_buffer("grid", grid)
        self.dim = len(grid) + 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # shares of hundreds of pixels need float32
            return self._histogram(x.float())

    def _histogram(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x * self.std + self.mean).clamp(0, 1)
        # a whole-pixel kernel, not adaptive pooling: ONNX exports it for any input size
        rgb = F.avg_pool2d(rgb, max(1, int(x.shape[-1]) // GRID_SIDE)).flatten(2).transpose(1, 2)  # (B, pixels, 3)
        product = (rgb.amin(2) < BACKGROUND).float()  # (B, pixels)
        area = product.sum(1, keepdim=True)
        weights = product / area.clamp(min=1)
        # |rgb - grid|^2 expanded: a matrix product, not a (B, pixels, colours, 3) tensor (half the time)
        distance = (rgb * rgb).sum(2, keepdim=True) - 2 * rgb @ self.grid.T + (self.grid * self.grid).sum(1)
        share = torch.einsum("bp,bpk->bk", weights, (-distance / (2 * SIGMA**2)).softmax(2))
        mean_colour = torch.einsum("bp,bpc->bc", weights, rgb)
        return torch.cat([share, mean_colour, area / rgb.shape[1]], 1)
