"""A clone of this repository stands alone: the protocol's spec and vectors live in it, and
nothing reads or links a directory beside the checkout."""

from __future__ import annotations

import re
import subprocess

from tests.support import REPO_ROOT, SPEC_DOC, VECTORS_DIR

# Built from parts so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", r"/work/" + "shared", r"\.\.[/\\]" + r"\.\.[/\\]" + "shared"]))


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.splitlines() if (REPO_ROOT / name).is_file()]


def test_no_file_reads_or_links_a_directory_beside_the_checkout():
    offenders = []
    for name in tracked_files():
        text = (REPO_ROOT / name).read_bytes().decode("utf-8", errors="replace")
        offenders += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}" for m in OUTSIDE.finditer(text)]
    assert offenders == []


def test_the_spec_and_its_vectors_are_part_of_the_repository():
    assert SPEC_DOC.is_file() and "tops-receipt/1" in SPEC_DOC.read_text()
    for name in ("valid.jsonl", "invalid.jsonl", "digests.txt", "key.json"):
        assert (VECTORS_DIR / name).stat().st_size > 0, name
    tracked = set(tracked_files())
    assert {"docs/spec/receipt-v1.md", "tests/vectors/valid.jsonl", "tests/vectors/invalid.jsonl"} <= tracked
