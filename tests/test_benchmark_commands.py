"""Benchmark commands as the docs write them: run at the smallest sizes, each finishes with exit 0
and prints what its docstring says it prints (the figures themselves are not checked), or refuses
bad input before starting work; and every ``--only`` mode the docs name is one its parser takes."""

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_replay_throughput_runs_every_backend_of_our_replay(tmp_path):
    # The docstring's second command, scaled down: windows of 32 px, two writers. Its windows
    # must be ones the replay accepts (whole view indices in the matches), or no row is made.
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "replay_throughput.py"), "--sizes", "32",
                          "--windows", "4", "--batches", "2", "--batch", "2", "--writers", "2", "--dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 32 |")]
    assert [row.split("|")[2].strip() for row in rows][:4] == [
        "service-memory (2 writers)", "service-durable (2 writers)", "buffer-memory", "buffer-durable"], out.stdout


def test_scaling_refuses_frames_that_its_patch_does_not_tile_before_starting_a_rank():
    # The model refuses such frames in every rank (after torchrun started them); the driver says so first.
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--device", "cpu", "--size", "tiny",
                          "--height", "64", "--width", "96", "--nprocs", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "--height 64 and --width 96 must be multiples of --patch 14" in out.stderr
    assert "torch.distributed" not in out.stdout + out.stderr


def _only_choices(script: Path) -> set[str]:
    """The ``--only`` choices of a benchmark's parser, read from its source (nothing imported)."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and node.args[0].value == "--only":
            return {e.value for kw in node.keywords if kw.arg == "choices" for e in kw.value.elts}
    return set()


def test_every_only_mode_the_docs_name_exists():
    # "decode.py --only budget", "labeler_throughput.py ... --only cpu-threads", and lists such as
    # "decode.py --only budget / intra / live / gpu" in README, ARCHITECTURE, docs/ and the scripts.
    texts = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "benchmarks").glob("*.*")), *sorted((REPO / "studies").glob("*.sh"))]
    missing = []
    for name in ("decode", "labeler_throughput"):
        choices = _only_choices(REPO / "benchmarks" / f"{name}.py")
        assert choices, name
        pattern = re.compile(rf"{name}\.py[^`\n]*?--only[ =]([a-z-]+(?: ?(?:/|\|) ?[a-z-]+)*)")
        for path in texts:
            for found in pattern.findall(path.read_text()):
                missing += [f"{path.name}: {name}.py --only {mode}" for mode in re.split(r" ?[/|] ?", found)
                            if mode not in choices]
    assert not missing, missing
