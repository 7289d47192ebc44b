"""The "shared" SID variant, faithful to the paper's reference code.

Matched against the reference implementation of Ye & Tang, "Learning without Global
Backpropagation via Synergistic Information Distillation" (arXiv 2510.03273), repository
ychAlbert/sid_bp, sid.py (classes FeatureExtractor, ProcessingModule, SID_Network):
- extractor: Conv(C,32)-ReLU-Conv(32,64)-ReLU-MaxPool2-Conv(64,128)-ReLU-Conv(128,128)-ReLU-
  MaxPool2-AdaptiveAvgPool(1)-Flatten-Linear(128, feat_dim=128), default PyTorch init;
- each module: Linear(K+feat_dim, 256)-ReLU-Linear(256, K) on cat(p_prev, z) -- belief first;
- forward: p_0 uniform, logits_i = g_i(cat(p_{i-1}, z)), p_i = softmax(logits_i).
Parameters are created in the reference's order (convs, extractor Linear, then each module's
two Linears), so under the same torch.manual_seed the initial values equal the reference's.
Deviation: a pool is skipped when the map is already below 2x2 (tiny inputs only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sidpipe.models.cnn import simplecnn_layers
from sidpipe.models.heads import uniform_prior


class SharedSIDNet(nn.Module):
    """Shared extractor E and n_modules belief modules g_i(p_{i-1}, z).

    z = E(x) keeps its gradient, so E is trained by the sum of all module losses.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        n_modules: int = 5,
        feat_dim: int = 128,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if n_modules < 1:
            raise ValueError(f"n_modules must be >= 1 (got {n_modules})")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.num_classes = int(num_classes)
        self.feat_dim = feat_dim
        self.extractor = nn.Sequential(
            *simplecnn_layers(self.in_shape),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, feat_dim),
        )
        self.sid_modules = nn.ModuleList(
            nn.Sequential(
                nn.Linear(num_classes + feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )
            for _ in range(n_modules)
        )

    @property
    def n_modules(self) -> int:
        return len(self.sid_modules)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every module (the last one is the prediction)."""
        z = self.extractor(x)
        p = uniform_prior(x.shape[0], self.num_classes, device=x.device, dtype=z.dtype)
        logits = []
        for g in self.sid_modules:
            out = g(torch.cat((p, z), dim=1))
            p = torch.softmax(out, dim=1)
            logits.append(out)
        return logits

    def bp_forward(self, x: Tensor) -> Tensor:
        """BP baseline as in the reference (same network, trained end to end on the last
        module's logits)."""
        return self.forward(x)[-1]
