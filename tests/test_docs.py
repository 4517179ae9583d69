"""
The documentation against the code it describes: every relative link and
#anchor in README.md and docs/*.md resolves (GitHub's anchor rules), every
option the docs give exists in C{twistd goma-pt --help} or C{twistd --help},
and the config reference's table lists exactly the keys goma-pt checks.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from goma_twisted.config_check import FORWARD_KEYS

from .support import ROOT, twistd_command, twistd_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.MULTILINE | re.DOTALL)
TWISTD = re.compile(r"(?:^|[\s/])twistd\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
HELP_OPTION = re.compile(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", re.MULTILINE)
CODE_SPAN = re.compile(r"`([^`\n]+)`")

# Options the docs name in code spans that belong to other programs: pip,
# PyPy, systemd-socket-activate, bench/run.py, podman.
OTHER_PROGRAMS = {
    "--config-settings",
    "--jit",
    "--datagram",
    "--procs",
    "--quick",
    "--cap-drop",
    "--cap-add",
    "--security-opt",
    "--read-only",
}


def prose(text: str) -> str:
    """The page without its fenced code blocks (headings and links inside are not)."""
    return FENCE.sub("", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(path.read_text())):
        slug = anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{page.name}: {target}: no such file")
        elif fragment and fragment not in anchors(resolved):
            broken.append(f"{page.name}: {target}: no such heading")
    return broken


def test_the_anchor_rule_is_githubs() -> None:
    assert anchor("Checking a file: `--check`") == "checking-a-file---check"
    assert anchor("`/healthz` and `/readyz`") == "healthz-and-readyz"
    assert anchor("In a venv, or on PyPy") == "in-a-venv-or-on-pypy"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Its part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#its-part) [ok](#page) [gone](missing.md) "
        "[bad](other.md#nothing) [web](https://example.com/x)\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#nothing: no such heading",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page() -> None:
    readme = prose((ROOT / "README.md").read_text())
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()


def help_options(*args: str) -> set[str]:
    result = subprocess.run(
        twistd_command(*args, "--help"),
        env=twistd_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(HELP_OPTION.findall(result.stdout))


def named_options(text: str) -> set[str]:
    """
    The options a page gives for twistd: in its code blocks, those on a command
    that runs twistd (continuation lines included); in its prose, those in code
    spans that start with one (C{`--drain 5`}, C{`twistd -n --pidfile=`}).
    """
    named = set()
    for block in FENCE.finditer(text):
        command = ""
        for line in block.group().splitlines():
            command += line
            if line.endswith("\\"):
                continue
            runs = TWISTD.split(command.split("#")[0], maxsplit=1)
            if len(runs) == 2:  # what follows twistd, not the podman before it
                named |= set(OPTION.findall(runs[1]))
            command = ""
    for span in CODE_SPAN.findall(prose(text)):
        if span.startswith("--") or span.startswith("twistd"):
            named |= set(OPTION.findall(span))
    return named


def test_the_options_given_for_twistd_are_found() -> None:
    text = (
        "Give `--drian 5` or `twistd -n --pidfile= goma-pt`; `pip --user` is not.\n"
        "```sh\n"
        "podman run --rm image twistd --nodaemon goma-pt \\\n"
        "    --config x  # --not-this\n"
        "curl --silent\n"
        "```\n"
    )
    assert named_options(text) == {"--drian", "--pidfile", "--nodaemon", "--config"}


def test_every_option_the_docs_name_exists() -> None:
    goma_pt = help_options("goma-pt")
    twistd = help_options()
    assert {"--config", "--drain", "--relay", "--watch"} <= goma_pt
    assert {"--nodaemon", "--pidfile", "--logfile", "--uid"} <= twistd
    named = {
        option
        for page in PAGES
        if page.name != "benchmarks.md"
        for option in named_options(page.read_text())
    }
    assert named - goma_pt - twistd - OTHER_PROGRAMS == set()


def test_the_options_table_lists_every_option_of_goma_pt() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `(--[a-z-]+)", text, re.MULTILINE)
    assert set(rows) == help_options("goma-pt") - {"--help"}


def test_the_config_table_lists_exactly_the_keys_goma_pt_checks() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([A-Za-z]+)` \|", text, re.MULTILINE)
    assert len(rows) == len(set(rows))
    assert set(rows) == set(FORWARD_KEYS)
