"""Bring your own model: `model=custom model.target=pkg.module:function`.

The function is called as `function(in_shape=(C, H, W), num_classes=K, **model.kwargs)` and
returns the network's natural layers, a list of `nn.Module`, each mapping the previous
layer's output to its own. sidpipe groups them into `model.blocks` blocks, gives every block
a belief head, and from there a custom model is like any model of the zoo: partitioning,
`partition=auto`, the SID pipeline and the BP baselines work on it unchanged. Like hydra's
`_target_`, the path may also be written with dots only (`pkg.module.function`).
"""

from __future__ import annotations

import importlib
import tempfile
import traceback
from typing import Any

from torch import nn

from sidpipe.errors import ConfigError


def load_target(target: str) -> Any:
    """The callable named by `pkg.module:attr` or `pkg.module.attr`; one-line errors."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"model.target={target!r} must look like pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.target={target!r}: cannot import {module_name} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module fails at import (SyntaxError...)
        raise user_code_error(target, f"importing {module_name}", e) from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"model.target={target!r}: {module_name} has no {attr}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"model.target={target!r} is not callable")
    return fn


def user_code_error(target: str, doing: str, e: BaseException) -> ConfigError:
    """The user's code failed: one line naming the target and the error; the user's own
    traceback goes to a log file the line points to (a 40-frame traceback of sidpipe's
    internals would bury it)."""
    with tempfile.NamedTemporaryFile(
        "w", prefix="sidpipe-model-target-", suffix=".log", delete=False
    ) as f:
        traceback.print_exception(e, file=f)
    what = " ".join(str(e).split()) or "no message"
    return ConfigError(
        f"model.target={target!r} failed while {doing}: {type(e).__name__}: {what[:200]} "
        f"(traceback in {f.name})"
    )


def custom_layers(
    target: str | None, in_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]
) -> list[nn.Module]:
    if target is None:
        raise ConfigError("model=custom needs model.target=pkg.module:function")
    fn = load_target(target)
    try:
        layers = fn(in_shape=in_shape, num_classes=num_classes, **kwargs)
    except Exception as e:  # noqa: BLE001 - the user's function fails: say which, and where
        raise user_code_error(target, "calling it", e) from None
    layers = list(layers) if isinstance(layers, (list, tuple, nn.ModuleList)) else None
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise ConfigError(
            f"model.target={target!r} must return a non-empty list of nn.Module layers"
        )
    return layers
