"""The documentation stays true to the tree: every relative link in README.md, docs/*.md and
benchmarks/results/README.md resolves (files, folders and #anchors), every `sidpipe train`,
`bench`, `accuracy` and `eval` example in their fenced code blocks composes through the
config schema as the CLI would compose it, and every key of the schema is documented in
docs/configuration.md. A renamed or misspelt key or a moved file fails here. In process:
composing a config starts nothing.

Conventions the checks rely on: a line in a code block that starts with `$ ` is a transcript
(it may show a mistake on purpose) and is not checked; a word without `=` after the command
(MODEL.pt, a run directory) is a placeholder or a positional argument, not an override;
`NAME=value` words on a line of their own set shell variables for the lines after them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sidpipe.bench.accuracy import parse as parse_study
from sidpipe.bench.throughput import BARE_KEYS
from sidpipe.config import LEAF_KEYS, check_command_line, compose_config
from sidpipe.errors import SidpipeError
from tests.conftest import REPO

PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"),
                REPO / "benchmarks" / "results" / "README.md"])  # fmt: skip
CHECKED = ("train", "bench", "accuracy", "eval")

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (link and code markup dropped), lower case,
    punctuation removed, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` that does not resolve, as 'target: why'."""
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def examples(page: Path) -> list[tuple[str, list[str], str]]:
    """(command, its overrides, the example as written) for every checked command in the
    page's fenced code blocks; also `-m sidpipe.train` under torchrun and the launchers in
    launch/, whose arguments are train overrides."""
    found = []
    for block in FENCE.findall(page.read_text()):
        vars_: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines()[1:-1]:
            if line.startswith("$ "):
                continue
            for name, value in vars_.items():
                line = line.replace("$" + name, value)
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            if words and all(re.match(r"^[A-Z_]+=", w.rstrip(";")) for w in words):
                vars_.update(w.rstrip(";").split("=", 1) for w in words)  # type: ignore[misc]
                continue
            for i, word in enumerate(words):
                if word == "sidpipe" and i + 1 < len(words) and words[i + 1] in CHECKED:
                    command, args = words[i + 1], words[i + 2 :]
                elif word == "sidpipe.train" or re.match(r"^launch/.*\.(sh|sbatch)$", word):
                    command, args = "train", words[i + 1 :]
                else:
                    continue
                args = [a for a in args if "=" in a or (a.startswith("-") and command != "eval")]
                found.append((command, args, line.strip()))
                break
    return found


def compose_example(command: str, args: list[str]) -> None:
    """The checks each command runs on its overrides before any work."""
    if command == "bench":  # the bench's own keys may be written bare
        args = [("bench." + a) if a.split("=", 1)[0] in BARE_KEYS else a for a in args]
    if command == "accuracy":
        parse_study(args)
    elif command == "eval":  # eval composes on a saved run's config: here, the default one
        compose_config([a for a in args if not a.startswith("-")])
    else:
        check_command_line(args)


def failures(page: Path) -> list[str]:
    bad = [f"{page.name}: link {b}" for b in broken_links(page)]
    for command, args, line in examples(page):
        try:
            compose_example(command, args)
        except SidpipeError as e:
            bad.append(f"{page.name}: `{line}`: {e}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve_and_examples_compose(page: Path) -> None:
    assert page.exists()
    bad = failures(page)
    assert not bad, "\n".join(bad)


def test_the_pages_hold_examples_to_check() -> None:
    """Guards the extraction itself: if it silently found nothing, the test above would pass."""
    commands = {c for page in PAGES for c, _, _ in examples(page)}
    assert commands == set(CHECKED)
    assert sum(len(LINK.findall(p.read_text())) for p in PAGES) > 50


def test_every_schema_key_is_documented() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    missing = [k for k in LEAF_KEYS if f"`{k}`" not in text]
    assert missing == [], f"keys of sidpipe/config.py missing from docs/configuration.md: {missing}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """A misspelt key, a bad value, a missing file and a missing anchor are each caught."""
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-section) [gone](missing.md) [no anchor](other.md#nope)\n"
        "[here](#page) [nowhere](#nowhere)\n\n```bash\n"
        "sidpipe train model.widht=3\n"
        "sidpipe bench mode=fast\n"
        "sidpipe eval MODEL.pt data=imagenett\n"
        "sidpipe accuracy study.nmae=blockwise\n"
        "torchrun --nproc-per-node 2 -m sidpipe.train pipeline.stages=0\n"
        "sidpipe train model.width=3   # fine\n"
        "$ sidpipe train model.widht=3\n"
        "```\n"
    )
    bad = failures(page)
    assert len(bad) == 8, bad
    assert "did you mean 'model.width'?" in bad[3]
    assert "bench.mode='fast'" in bad[4]
    assert "data=imagenett" in bad[5] and "study.nmae" in bad[6]
    assert "pipeline.stages must be >= 1" in bad[7]


@pytest.mark.parametrize(
    "heading,anchor",
    [
        ("1. The method", "1-the-method"),
        ("Latest results: S=2, every schedule (2026-12-01)",
         "latest-results-s2-every-schedule-2026-12-01"),
        ("CIFAR-10 convnets: K = 2/4/8", "cifar-10-convnets-k--248"),
        ("`sidpipe bench` and [links](x.md)", "sidpipe-bench-and-links"),
    ],
)  # fmt: skip
def test_slug_matches_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
