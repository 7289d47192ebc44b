"""The data layer: load a dataset into RAM as uint8 tensors and iterate it in seeded batches.

Every dataset fits in memory, so there is no DataLoader and no worker process, and the order
of samples is a pure function of (seed, epoch). By role:
  bundle    what a loaded dataset is (Split, TextSplit, DataBundle), the data root, the
            seeded random streams
  images    the image datasets' readers (digits, MNIST / Fashion-MNIST IDX files, CIFAR,
            synthetic), every file checked
  text      the text datasets: a file's bytes cut into splits and tokenized
  splits    stratified splits, the validation hold-out, label noise
  load      load_data: which reader, then subset -> hold-out -> label noise
  batches   seeded batch iterators (images, text windows) for training and evaluation
"""

from sidpipe.data.batches import Batches, TextBatches, eval_splits, shuffled_batches, train_batches
from sidpipe.data.bundle import DATASET_SHAPES, DataBundle, Split, TextSplit, resolve_root
from sidpipe.data.load import load_data
from sidpipe.data.text import text_bytes_per_token

__all__ = [
    "DATASET_SHAPES",
    "Batches",
    "DataBundle",
    "Split",
    "TextBatches",
    "TextSplit",
    "eval_splits",
    "load_data",
    "resolve_root",
    "shuffled_batches",
    "text_bytes_per_token",
    "train_batches",
]
