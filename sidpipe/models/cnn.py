"""SimpleCNN (the SID reference feature extractor, as natural layers) and VGG-11."""

from __future__ import annotations

from torch import nn

# VGG-11 ("A" configuration); "M" = 2x2 max-pool, attached to the conv before it.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _check_image(in_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(
            f"model.name={model!r} needs image inputs (C,H,W); got in_shape={in_shape}"
        )
    c, h, w = (int(s) for s in in_shape)
    return c, h, w


def simplecnn_layers(in_shape: tuple[int, ...], width: int = 32) -> list[nn.Module]:
    """Four conv stages 32-64-128-128 (3x3, pad 1, ReLU); max-pool(2) after stages 2 and 4.
    `width` scales them as width x (1, 2, 4, 4).

    Matches the reference SID FeatureExtractor's conv part (ychAlbert/sid_bp, sid.py): conv ->
    ReLU, pool after the 2nd and 4th ReLU, default PyTorch init, built in the same order. A
    pool is skipped when the map is already smaller than 2x2 so tiny inputs still work.
    """
    c, h, w = _check_image(in_shape, "simplecnn")
    layers: list[nn.Module] = []
    for i, out in enumerate((width, 2 * width, 4 * width, 4 * width)):
        mods: list[nn.Module] = [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if i in (1, 3) and h >= 2 and w >= 2:
            mods.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        layers.append(nn.Sequential(*mods))
        c = out
    return layers


def vgg11_layers(in_shape: tuple[int, ...], width: int = 64) -> list[nn.Module]:
    """Eight natural layers: conv3x3+BN+ReLU each, with the following max-pool attached.
    Channels are VGG11_CFG's scaled by width / 64 (64 is the standard VGG-11).

    Pools are skipped once H or W < 2, so 28x28 and 8x8 inputs work (32x32 ends at 1x1).
    """
    c, h, w = _check_image(in_shape, "vgg11")
    layers: list[list[nn.Module]] = []
    for v in VGG11_CFG:
        if v == "M":
            if h >= 2 and w >= 2:
                layers[-1].append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        out = int(v) * width // 64
        layers.append(
            [
                nn.Conv2d(c, out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
        )
        c = out
    return [nn.Sequential(*mods) for mods in layers]
