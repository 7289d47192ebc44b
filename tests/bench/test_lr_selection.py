"""benchmarks/lr_selection.py on hand-made study rows: the lr is chosen on validation only,
and the gap to BP pairs each method's chosen lr with BP's own."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "lr_selection.py"
spec = importlib.util.spec_from_file_location("lr_selection", SCRIPT)
lr_selection = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lr_selection)


def study(folder: Path, accs: dict[tuple, tuple[float, float]]) -> Path:
    """blockwise.json with two seeds per (method, blocks): (best validation, test)."""
    rows = [
        {"status": "ran", "model": "vgg11", "method": m, "blocks": k, "seed": s,
         "val_curve": [0.1, val + 0.01 * s], "val_selected_test_accuracy": test + 0.01 * s}
        for (m, k), (val, test) in accs.items() for s in (0, 1)
    ]  # fmt: skip
    folder.mkdir()
    (folder / "blockwise.json").write_text(json.dumps({"rows": rows}))
    return folder


def test_the_lr_is_chosen_on_validation_and_each_side_uses_its_own(tmp_path) -> None:
    low = study(tmp_path / "low", {("bp", None): (0.60, 0.58), ("sid", 4): (0.50, 0.40)})
    # at the high lr BP's validation is worse but its test better: it must not be chosen
    high = study(tmp_path / "high", {("bp", None): (0.55, 0.62), ("sid", 4): (0.52, 0.45),
                                     ("sid", 8): (0.9, 0.9)})  # fmt: skip
    lines = lr_selection.selection_table({"1e-4": low, "1e-3": high}).splitlines()
    assert len(lines) == 4  # header, rule, BP, SID 4 (SID 8 lacks the low lr: left out)
    assert lines[2] == "| vgg11 | bp | – | 60.5 / 58.5 | 55.5 / 62.5 | 1e-4 | 58.50 ± 0.71 | – |"
    # SID chooses 1e-3 (validation 52.5 > 50.5), BP 1e-4: 45.5 - 58.5 per seed
    assert lines[3].endswith("| 1e-3 | 45.50 ± 0.71 | -13.00 ± 0.00 |")


def test_a_missing_study_is_named(tmp_path, capsys) -> None:
    assert lr_selection.main([f"1e-3={tmp_path}"]) == 2
    assert f"no blockwise.json in {tmp_path} (lr 1e-3)" in capsys.readouterr().err
    assert lr_selection.main(["no-equals-sign"]) == 2
