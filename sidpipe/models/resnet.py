"""CIFAR-style ResNet-18: 3x3 stem (no max-pool) and BasicBlocks [2, 2, 2, 2]."""

from __future__ import annotations

from torch import Tensor, nn

from sidpipe.models.cnn import _check_image


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


def resnet18_layers(in_shape: tuple[int, ...], width: int = 64) -> list[nn.Module]:
    """Eight natural layers = the eight BasicBlocks; the stem is prepended to the first.
    Stage channels are width x (1, 2, 4, 8): 64 is the standard ResNet-18."""
    c, _, _ = _check_image(in_shape, "resnet18")
    stem = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
    )
    layers: list[nn.Module] = []
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for j in range(2):
            stride = 2 if stage > 0 and j == 0 else 1
            layers.append(BasicBlock(c_in, c_out, stride))
            c_in = c_out
    layers[0] = nn.Sequential(stem, layers[0])
    return layers
