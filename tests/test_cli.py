"""The `sidpipe` command surface, in process: help, a missing or unknown command."""

from __future__ import annotations

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
