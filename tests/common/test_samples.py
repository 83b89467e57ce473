"""`python -m common.samples`: the bundled photos' paths, for the README's classify line and `make classify`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from common.samples import sample_photos


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.samples", *args], capture_output=True, text=True, timeout=60)


def test_paths_of_named_photos_in_order():
    done = _run("--paths", "coffee", "chelsea")
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert paths == [str(sample_photos(["coffee"])["coffee"]), str(sample_photos(["chelsea"])["chelsea"])]
    assert all(Path(p).is_file() for p in paths)


def test_a_repeated_name_gives_its_path_again():
    done = _run("--paths", "chelsea", "chelsea")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(sample_photos(["chelsea", "chelsea"])["chelsea"])] * 2


def test_unknown_photo_is_one_line():
    done = _run("--paths", "no_such_photo")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "unknown sample photo 'no_such_photo'" in done.stderr and "chelsea" in done.stderr
