"""The `sidpipe` command surface, in process: help, a missing or unknown command."""

from __future__ import annotations

import sys

import pytest

from sidpipe.cli import COMMANDS, main


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_every_command(flag, capsys):
    code, out, _ = run([flag], capsys)
    assert code == 0
    for command in COMMANDS:
        assert f"  {command} " in out


def test_bare_sidpipe_shows_usage_and_trains_nothing(capsys):
    code, out, _ = run([], capsys)
    assert code == 2 and "usage: sidpipe <command>" in out


BAD = [(["fly"], "unknown command 'fly'"), (["model=mlp"], "overrides go after a command")]


@pytest.mark.parametrize("argv,hint", BAD)
def test_unknown_command_is_one_clear_line(argv, hint, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.splitlines()[0].startswith("sidpipe: error: ") and hint in err.splitlines()[0]


@pytest.mark.parametrize("command", ["export", "eval"])
def test_each_command_has_help(command, capsys):
    main([command, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sidpipe {command} ")


TYPO = "sidpipe: error: unknown key 'model.widht' (did you mean 'model.width'?)"


@pytest.mark.parametrize("command", ["train", "bench", "accuracy"])
@pytest.mark.parametrize("typo", ["model.widht=3", "+model.widht=3"])
def test_misspelt_key_is_one_line_naming_the_nearest_key(command, typo, capsys, monkeypatch):
    """Refused before hydra (whose seven lines advise `+model.widht=3`, which it then
    accepts silently) and before any process starts (the fast tier refuses one)."""
    monkeypatch.setattr("sys.argv", list(sys.argv))  # the CLI hands hydra its overrides there
    code, out, err = run([command, typo], capsys)
    assert code != 0 and out == ""
    assert err.strip().splitlines() == [TYPO]


@pytest.mark.parametrize(
    "argv,line",
    [
        (["train", "model=resnte18"], "unknown option 'model=resnte18' (did you mean 'model=resn"),
        (["bench", "mdoe=tta"], "unknown key 'mdoe' (`sidpipe train --cfg job` lists the keys)"),
        (["train", "train.epochs=abc"], "Value 'abc' of type 'str' could not be converted to Int"),
        (["train", "-m", "sid.alhpa=0.3,0.5"], "unknown key 'sid.alhpa' (did you mean 'sid.alph"),
    ],
)  # fmt: skip
def test_other_first_contact_mistakes_are_one_line(argv, line, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", list(sys.argv))
    code, out, err = run(argv, capsys)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidpipe: error: ") and line in lines[0], err
