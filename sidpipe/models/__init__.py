"""Model zoo: networks as chains of blocks with one belief head per block.

Each architecture supplies its natural layers (mlp.py, cnn.py, resnet.py, vit.py);
`build_model` (build.py) groups them into `cfg.blocks` blocks of a `BlockNet` (blocknet.py)
and attaches a belief head to each (`model.head`: models/heads.py).
Nothing here imports runtime code (no torch.distributed, no trainers).
"""

from sidpipe.models.blocknet import BlockNet
from sidpipe.models.build import build_model, build_net, natural_layers
from sidpipe.models.shared import SharedSIDNet

__all__ = ["BlockNet", "SharedSIDNet", "build_model", "build_net", "natural_layers"]
