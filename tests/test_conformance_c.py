"""spec/conformance/c: every update rule of the registry in C11, written from the spec pages,
reads the vectors with its own JSON reader and passes every case of every optimizer suite (one
per rule of fisheropt.refimpl.RULES: a rule the runner lacks shows as skipped cases and fails);
builds with a deliberate mistake fail exactly the cases the vectors say they should."""

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fisheropt import vectors

SOURCE = vectors.VECTOR_DIR.parent / "conformance" / "c" / "fo_conform.c"
COMPILER = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror", "-ffp-contract=off"]
# Every optimizer suite: one per rule of the registry (vectors.OPTIMIZER_SUITES = fisheropt.refimpl.RULES).
FILES = [vectors.VECTOR_DIR / f"{s}.json" for s in vectors.OPTIMIZER_SUITES]

pytestmark = [
    pytest.mark.skipif(COMPILER is None, reason="no C compiler (gcc, cc or clang) on PATH"),
    pytest.mark.skipif(not SOURCE.is_file(), reason="spec/conformance/c is not in this installation"),
]


def _build(directory: Path, *extra: str) -> Path:
    exe = directory / "fo_conform"
    done = subprocess.run(
        [COMPILER, *FLAGS, *extra, "-o", str(exe), str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{COMPILER} failed:\n{done.stderr}"
    return exe


def _run(exe: Path):
    done = subprocess.run([str(exe), *map(str, FILES)], capture_output=True, text=True, timeout=120)
    summary = dict(re.findall(r"^(\w+): (\d+/\d+ cases passed \(\d+ skipped\))$", done.stdout, re.M))
    failed = set(re.findall(r"^FAIL (\w+)/(\S+):", done.stdout, re.M))
    return done, summary, failed


def _cases(suite):
    return vectors.load_suite(suite)["cases"]


def test_the_runner_is_given_every_vector_file_of_optimizer_cases():
    """The files the runner checks are exactly the vector files whose cases are optimizer steps."""
    optimizer_files = {
        p.stem
        for p in vectors.VECTOR_DIR.glob("*.json")
        if p.stem != "schema" and any(c["kind"] == "optimizer" for c in vectors.load_suite(p.stem)["cases"])
    }
    assert optimizer_files == {f.stem for f in FILES} and len(FILES) == len(vectors.OPTIMIZER_SUITES) >= 5


def test_c_runner_passes_every_optimizer_suite(tmp_path):
    done, summary, failed = _run(_build(tmp_path))
    assert done.returncode == 0 and not failed, done.stdout + done.stderr
    for suite in vectors.OPTIMIZER_SUITES:
        n = len(_cases(suite))
        assert summary.get(suite) == f"{n}/{n} cases passed (0 skipped)", done.stdout


def test_c_runner_without_theta_update_fails_the_cases_that_say_so(tmp_path):
    """-DMUTANT_NO_THETA_UPDATE: θ is never written. It must fail exactly the cases whose
    ``kills`` list never_update_theta (every case in which θ moves)."""
    done, summary, failed = _run(_build(tmp_path, "-DMUTANT_NO_THETA_UPDATE"))
    assert done.returncode == 1, done.stdout + done.stderr
    expected = {
        (s, c["name"]) for s in vectors.OPTIMIZER_SUITES for c in _cases(s) if "never_update_theta" in c["kills"]
    }
    assert failed == expected


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="-ffast-math sets flush-to-zero at program start on x86-64 only",
)
def test_c_runner_built_with_fast_math_fails(tmp_path):
    """-ffast-math turns on flush-to-zero: the runner says so, and every float32 case that kills
    flush_to_zero fails. (The float64 ones need not: under DAZ the comparison of a float64
    subnormal flushes too, which is why the environment line alone is a failure.)"""
    done, summary, failed = _run(_build(tmp_path, "-ffast-math"))
    assert done.returncode == 1
    assert "FAIL environment: subnormal numbers are flushed to zero" in done.stdout
    subnormal = {
        (s, c["name"])
        for s in vectors.OPTIMIZER_SUITES
        for c in _cases(s)
        if "flush_to_zero" in c["kills"] and c["dtype"] == "float32"
    }
    assert subnormal and subnormal <= failed
