"""No file in the repository points a reader at a design document the repository does not ship.

The project's internal design notes live outside the repository, so a clone cannot follow a
reference to them. Docstrings, comments, tests and the README cite public sources instead (the
official release's code, the DeepSeek reports, HF transformers, library docs; README, "Sources")
or the README section / module that holds a design decision. This scans every tracked .py, .md,
.toml and .sh file (`git ls-files`) for the notes' file names and their folder, and for the
"spec" + section-number shorthand that meant sections of the architecture note.

The names are assembled below, so this file does not match itself.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".toml", ".sh")
NOTES = ("DESIGN", "v4-architecture", "training-and-serving", "STYLE", "performance")
FORBIDDEN = [n + ".md" for n in NOTES] + ["shared" + "/docs"]
SPEC_SECTION = re.compile(r"\bspec" + r" (?:section )?\d")  # the shorthand, e.g. section 3.1

# Files exempted while someone else edits them (none now).
PENDING: set[str] = set()


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no tracked-file list")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p.endswith(SUFFIXES) and p not in PENDING]


def _hits(match) -> list[str]:
    found = []
    for rel in _tracked():
        path = REPO / rel
        if not path.is_file():  # deleted in the working tree, not yet in the index
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n")):
            if match(line):
                found.append(f"{rel}:{n + 1}: {line.strip()}")
    return found


def test_no_reference_to_unshipped_design_notes():
    found = _hits(lambda line: any(name in line for name in FORBIDDEN))
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_no_spec_section_shorthand():
    found = _hits(SPEC_SECTION.search)
    assert not found, "'spec N' points at an unshipped note; cite a public source:\n" + "\n".join(
        found
    )


def test_the_scan_sees_a_reference():
    """The matchers fire on the forms they must catch (so an empty scan means something)."""
    note = NOTES[1] + ".md"
    assert any(name in f"see `{note}` section 3" for name in FORBIDDEN)
    assert any(name in "/work/shared" + "/docs/x" for name in FORBIDDEN)
    spec = "spec"
    assert SPEC_SECTION.search(f"({spec} 3.1)") and SPEC_SECTION.search(f"{spec} section 8")
    assert not SPEC_SECTION.search(f"mesh {spec} 'expert=4'")
