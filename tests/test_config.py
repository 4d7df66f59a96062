"""Configuration loading: YAML + overrides into typed dataclasses, strict errors naming keys."""

from pathlib import Path

import pytest
import yaml

from reliev3r import config
from reliev3r.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for name in ("default.yaml", "demo.yaml"):
        cfg = config.load([ROOT / "configs" / name])
        assert cfg.streamer.views >= 2
    demo = config.load([ROOT / "configs" / "default.yaml", ROOT / "configs" / "demo.yaml"])
    assert demo.run.dir == "runs/demo"


DIFFERS_BY_PURPOSE: dict[str, str] = {}
"""Keys that configs/default.yaml may set to something other than their dataclass default,
each with the reason (also a comment beside the key there). None today: one default per option."""


def _leaves(data: dict, prefix: str = ""):
    """(dotted key, value) of every value a YAML file sets (sections are walked, not values)."""
    for key, value in (data or {}).items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        elif value is not None:
            yield f"{prefix}{key}", value


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def default_violations(path: Path) -> dict[str, list[str]]:
    """What breaks "one default per option" when ``path`` is the file every command loads first:
    ``different``, options whose dataclass default is not what the loaded config holds;
    ``repeated``, keys the file sets to their dataclass default (DIFFERS_BY_PURPOSE aside)."""
    import yaml

    loaded = _flatten(config.to_dict(config.load([path])))
    defaults = _flatten(config.to_dict(config.PipelineConfig()))
    missing = object()
    different = sorted(f"{k}: dataclass {defaults.get(k, missing)!r}, loaded {loaded.get(k, missing)!r}"
                       for k in loaded.keys() | defaults.keys()
                       if k not in DIFFERS_BY_PURPOSE and loaded.get(k, missing) != defaults.get(k, missing))
    repeated = sorted(k for k, _ in _leaves(yaml.safe_load(Path(path).read_text()))
                      if k not in DIFFERS_BY_PURPOSE and loaded.get(k, missing) == defaults.get(k, missing))
    return {"different": different, "repeated": repeated}


def test_one_default_per_option():
    """ARCHITECTURE.md, "One default per option": what ``reliev3r up`` runs with, unless told
    otherwise, is the dataclass defaults, and configs/default.yaml (the file every command loads
    first) neither repeats a field's default nor sets a different one (DIFFERS_BY_PURPOSE aside)."""
    from reliev3r import cli

    args = cli._parser().parse_args(["up"])
    assert cli.config_paths(args) == [cli.DEFAULT_CONFIG]
    assert config.to_dict(cli.load_config(args)) == config.to_dict(config.load([cli.DEFAULT_CONFIG]))
    assert default_violations(cli.DEFAULT_CONFIG) == {"different": [], "repeated": []}
    for key in DIFFERS_BY_PURPOSE:
        up, dataclass = (_flatten(config.to_dict(c))[key] for c in (cli.load_config(args), config.PipelineConfig()))
        assert up != dataclass, f"{key} no longer differs: drop it from DIFFERS_BY_PURPOSE"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_recipe_files_set_only_what_differs(recipe):
    """A recipe file (configs/*.yaml) holds what differs from the defaults: a key set to its
    dataclass default would be a second place that default lives."""
    assert default_violations(ROOT / "configs" / recipe)["repeated"] == []


def test_the_default_check_sees_what_it_must(tmp_path):
    yaml_file = tmp_path / "default.yaml"
    yaml_file.write_text("replay:\n  min_size: 4\n  dedup: false\nlabeler:\n  teacher: oracle\nlearner:\n")
    found = default_violations(yaml_file)
    assert found["repeated"] == ["replay.min_size"]
    # the match terms' share of the shape follows the teacher (LossConfig.match_shape_weight)
    assert [d.split(":")[0] for d in found["different"]] == ["labeler.teacher", "learner.loss.match_shape_weight",
                                                             "replay.dedup"]


def test_overrides_are_typed():
    cfg = config.load([], ["learner.lr=1e-3", "streamer.views=6", "streamer.sources=[a.mp4, b.mp4]",
                           "replay.durable=true", "labeler.teacher=oracle"])
    assert cfg.learner.lr == 1e-3 and cfg.streamer.views == 6
    assert cfg.streamer.sources == ["a.mp4", "b.mp4"] and cfg.replay.durable is True


@pytest.mark.parametrize("override, message", [
    ("learner.lrr=1", "learner.lrr: unknown key (did you mean 'lr'?)"),
    ("learner.lr=fast", "learner.lr: expected a number"),
    ("replay.sampler=best", "replay.sampler: 'best' is not one of"),
    ("streamer.views=1", "streamer.views must be >= 2"),
    ("streamer.synthetic.height=4", "streamer.synthetic.height"),
    ("learner.model.size=huge", "learner.model.size"),
    ("nosection.x=1", "nosection: unknown key"),
    ("replay.durable=maybe", "replay.durable: expected true/false"),
    ("learner.max_steps=2.5", "learner.max_steps: expected an integer"),
    ("run.seed=-1", "run.seed must be >= 0"),  # the replay's first sample failed on it
    ("run.feeder_nice=30", "run.feeder_nice must be in 0..19"),
    ("streamer.jpeg_quality=-20", "streamer.jpeg_quality must be in 1..100, got -20"),  # OpenCV clamped it
    ("streamer.jpeg_quality=1000", "streamer.jpeg_quality must be in 1..100, got 1000"),
    ("streamer.jpeg_quality=0", "streamer.jpeg_quality must be in 1..100, got 0"),
    ("streamer.height=20", "(20x128) must be multiples of learner.model.patch_size (8)"),  # never stepped
    ("replay.capacity_windows=3", "min_size (4) must be <= capacity_windows (3)"),  # the learner waited forever
    ("replay.samples_per_insert=100", "tolerance (64.0) must be >= max(1, samples_per_insert)"),  # replay's start
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        config.load([], [override])
    assert message in str(err.value)


@pytest.mark.parametrize("given", ["streamer.height=168x224", "streamer.width=224x168", "streamer.height=168 x 224",
                                   "streamer.synthetic.width=192x144"])
def test_a_size_given_as_one_value_is_refused_saying_height_and_width_are_keys_of_their_own(given, tmp_path):
    """An image size is two keys, ``height`` and ``width`` (``streamer.height``, ``streamer.width``,
    ``streamer.synthetic.*``), which the code reads as (H, W); a size written as one value
    ("168x224", which could be either order) is refused naming the key, the value and the two keys
    to give, from the command line and from a YAML file alike. Before, only "expected an integer"."""
    key, value = given.split("=")
    section, field = key.rsplit(".", 1)
    for source in ("override", "file"):
        if source == "override":
            args = [], [given]
        else:
            data = {field: value}
            for part in reversed(section.split(".")):
                data = {part: data}
            (tmp_path / "size.yaml").write_text(yaml.safe_dump(data))
            args = [tmp_path / "size.yaml"], []
        with pytest.raises(ConfigError) as err:
            config.load(*args)
        said = str(err.value)
        assert said.startswith(f"{key}: ") and repr(value) in said, said
        assert f"{section}.height" in said and f"{section}.width" in said and "one value" in said, said


def test_the_window_size_default_yaml_states_is_the_default_in_height_x_width():
    """configs/default.yaml's comment names the default window size as every doc writes a size of
    ``height``/``width`` keys: height x width, the order the code reads them in. It said 128x96."""
    from streamer.config import StreamerConfig

    text = (ROOT / "configs" / "default.yaml").read_text()
    assert f"windows at {StreamerConfig().height}x{StreamerConfig().width} " in text


def test_xfeat_is_refused_for_frames_smaller_than_its_32_pixel_cells():
    """``labeler.matcher=xfeat`` with a ``streamer.height`` or ``width`` below 32: XFeat resamples
    a frame to whole 32-pixel cells (``labelers.config.XFEAT_MIN_SIDE``), none at 24 px, and the
    labeler's matching of every window divided by zero inside the package. Refused at load,
    naming the keys and the size; 32 loads, as does SIFT at 24."""
    for sizes in (["streamer.height=24"], ["streamer.width=16"]):
        with pytest.raises(ConfigError, match="labeler.matcher=xfeat needs streamer.height and streamer.width "
                                              "of at least 32"):
            config.load([], ["labeler.matcher=xfeat", *sizes])
    assert config.load([], ["labeler.matcher=xfeat", "streamer.height=32"]).streamer.height == 32
    assert config.load([], ["streamer.height=24"]).labeler.matcher == "sift"


@pytest.mark.parametrize("override, message", [
    # Each passed the checks before and failed or misbehaved once the learner ran.
    ("learner.device=gpu", "learner.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),  # torch refused it
    ("learner.device=cuda:x", "learner.device must be"),
    ("labeler.device=auto", "labeler.device must be 'cpu', 'cuda' or 'cuda:N', got 'auto'"),  # no 'auto' there
    ("labeler.device=gpu", "labeler.device must be"),
    ("learner.threads=-1", "learner.threads must be >= 0"),  # torch.set_num_threads refused it
    ("learner.model.head_dim=12", "learner.model.head_dim 12 does not divide size 'tiny''s dim 128"),  # model build
    ("learner.lr=.nan", "learner.lr must be a finite number"),  # the optimizer refused it
    ("learner.lr=.inf", "learner.lr must be a finite number"),
    ("learner.weight_decay=-0.1", "learner.weight_decay must be >= 0"),  # trained with negative decay
    ("learner.weight_decay=.nan", "learner.weight_decay must be a finite number"),
    ("learner.grad_clip=-1", "learner.grad_clip must be >= 0"),  # silently meant no clipping
    ("learner.grad_clip=.nan", "learner.grad_clip must be a finite number"),
    ("learner.grad_clip=.inf", "learner.grad_clip must be a finite number"),  # a second spelling of 0
    ("learner.batch_size=4097", "learner.batch_size must be >= 1 and <= 4096"),  # the replay refused every sample
    ("learner.self_target_step=-5", "learner.self_target_step must be >= 0"),  # silently on from the first step
    ("learner.model.max_log_depth=.nan", "learner.model.max_log_depth must be a finite number"),
    ("learner.loss.alpha=.nan", "learner.loss.alpha must be a finite number"),
    ("learner.loss.scale_deg=.inf", "learner.loss.scale_deg must be a finite number"),
    ("learner.loss.refine.lr=.nan", "learner.loss.refine.lr must be a finite number"),
])
def test_values_the_learner_cannot_run_are_refused_naming_the_key(override, message):
    """Refused when the config is read, not once the learner has started."""
    with pytest.raises(ConfigError) as err:
        config.load([], [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override", ["run.dir=", "run.dir=' '"])
def test_an_empty_run_dir_is_refused(override):
    """``run.dir=`` (a value forgotten on the command line) once ran the whole pipeline in the
    working directory: snapshots, logs and ``config.yaml`` beside the user's files, the streamer's
    progress in a checkout's ``streamer/`` package."""
    with pytest.raises(ConfigError, match="run.dir must name a folder"):
        config.load([], [override])


@pytest.mark.parametrize("overrides", [
    *([f"learner.device={d}", f"labeler.device={d}"] for d in ("cpu", "cuda", "cuda:0", "cuda:12")),
    ["learner.device=auto"],
    ["learner.model.size=small", "learner.model.head_dim=32"],  # divides 384 as it does 128
])
def test_values_that_may_run_elsewhere_are_accepted(overrides):
    """A config written on one host runs on another: ``cuda`` is not refused where there is none."""
    cfg = config.load([], overrides)
    for text in overrides:
        key, value = text.split("=")
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert str(node) == value


def test_jpeg_quality_takes_its_bounds():
    assert [config.load([], [f"streamer.jpeg_quality={q}"]).streamer.jpeg_quality for q in (1, 100)] == [1, 100]


def test_bad_yaml_and_override_syntax(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load([bad])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        config.load([], ["learner.lr"])


def test_round_trip_through_plain_data():
    cfg = config.load([], ["learner.lr=0.01"])
    again = config.build(config.PipelineConfig, config.to_dict(cfg))
    assert again == cfg


def test_cli_reports_config_errors(capsys):
    from reliev3r.cli import main

    assert main(["stream", "streamer.views=1"]) == 2
    assert "streamer.views must be >= 2" in capsys.readouterr().err


def test_teacher_train_options_stand_anywhere_among_its_flags(tmp_path, capsys):
    """``teacher-train steps=3 --out X dining=false`` refused the option after the flag as an
    unrecognized argument; it reaches the recipe (which names the bad value here, before it
    renders anything)."""
    from reliev3r.cli import main

    assert main(["teacher-train", "batch=2", "--out", str(tmp_path), "--device", "cpu", "eyes_per_world=0"]) == 2
    assert "eyes_per_world must be >= 1" in capsys.readouterr().err
    assert main(["teacher-train", "--out", str(tmp_path), "--device", "cpu", "bogus"]) == 2  # refused as before
    assert "bogus" in capsys.readouterr().err


def test_teacher_train_refuses_a_device_this_host_does_not_have(tmp_path, capsys):
    """``teacher-train --device cuda`` (its default) on a host without CUDA stopped with torch's
    "Torch not compiled with CUDA enabled" once it rendered (exit 1). A device this host does not
    have is said in a line naming it and the devices there are, exit 2, before anything is written
    (``cuda:N`` past the GPUs is absent on any host)."""
    import torch

    from reliev3r.cli import main

    present = ", ".join(["cpu", *(f"cuda:{k}" for k in range(torch.cuda.device_count()))])
    out = tmp_path / "teacher"
    for device in [f"cuda:{torch.cuda.device_count()}"] + ([] if torch.cuda.is_available() else ["cuda"]):
        assert main(["teacher-train", "--out", str(out), "--device", device, "--steps", "1"]) == 2, device
        assert capsys.readouterr().err.strip() == (f"reliev3r teacher-train: --device {device!r} is not available "
                                                   f"here (available: {present})")
        assert not out.exists()


def test_overrides_stand_anywhere_among_the_options(tmp_path, capsys):
    """``key.sub=value`` words after an option were refused ("unrecognized arguments"), and
    ``view`` took an override for its run folder and the folder for an override: they are
    overrides, in order, wherever they stand; ``view``'s folder is the word that is none."""
    from reliev3r.cli import main

    # the override after the option reaches the config (refused there, before anything starts)
    assert main(["up", "learner.lr=1e-3", "--max-steps", "50", "streamer.views=1"]) == 2
    assert "streamer.views must be >= 2" in capsys.readouterr().err
    # in order: the later value wins (the config is valid, the checkpoint is what stops it)
    assert main(["eval", "--checkpoint", str(tmp_path), "streamer.views=1", "--views", "3", "streamer.views=4"]) == 2
    err = capsys.readouterr().err
    assert "no valid snapshot there" in err and "config error" not in err
    missing = tmp_path / "missing"
    for argv in ([str(missing), "evaluator.windows=1", "--out", str(tmp_path / "x.rrd")],
                 [str(missing), "--snapshots", "1", "evaluator.windows=1"],
                 ["evaluator.windows=1", "--snapshots", "1", str(missing)]):
        assert main(["view", *argv]) == 2, argv
        assert f"reliev3r view: {missing}: neither a reconstruction" in capsys.readouterr().err, argv
    assert main(["view", str(missing), "--snapshots", "1", "evaluator.windows=0"]) == 2
    assert "config error: evaluator" in capsys.readouterr().err
    # a word that is no override is refused as before, wherever it stands
    for argv in (["up", "learner.lr=1e-3", "--max-steps", "5", "bogus"],
                 ["view", str(missing), "--snapshots", "1", str(tmp_path / "other")],
                 ["view", "evaluator.windows=1", "--snapshots", "1"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and ("unrecognized arguments" in err or "required: target" in err), argv


class _Started(Exception):
    """Raised where ``up`` would start its supervisor: nothing starts in these tests."""


@pytest.mark.parametrize("command", ["up", "pretrain"])
def test_max_steps_below_zero_is_refused_by_name(command, capsys, monkeypatch):
    """``--max-steps -1`` was set on the config past its check: the run started, its learner
    refused the value at every start and ``up`` ended with exit 1 without saying why."""
    from reliev3r import cli, supervisor

    steps = []

    def supervisor_of(cfg):
        steps.append(cfg.learner.max_steps)
        raise _Started

    monkeypatch.setattr(supervisor, "Supervisor", supervisor_of)
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--max-steps", "-1"])
    assert stop.value.code == 2 and "--max-steps: must be >= 0, got -1" in capsys.readouterr().err
    assert not steps
    with pytest.raises(_Started):  # 0: no end, as the config's own max_steps
        cli.main([command, "--max-steps", "0"])
    assert steps == [0]


def test_the_optional_refine_section_from_yaml_and_overrides(tmp_path):
    from learner.config import RefineConfig

    assert config.load([]).learner.loss.refine is None  # off by default
    on = tmp_path / "refine.yaml"
    on.write_text("learner:\n  loss:\n    refine: {weight: 1, depth: teacher}\n")
    cfg = config.load([on])
    assert cfg.learner.loss.refine == RefineConfig(weight=1.0, depth="teacher")
    # An override into the absent section creates it with its defaults, then sets the key.
    cfg = config.load([], ["learner.loss.refine.steps=5"])
    assert cfg.learner.loss.refine == RefineConfig(steps=5)
    again = config.with_overrides(config.load([]), ["learner.loss.refine.weight=2"])
    assert again.learner.loss.refine == RefineConfig(weight=2.0)
    assert config.with_overrides(again, ["learner.loss.refine=null"]).learner.loss.refine is None
    assert config.build(config.PipelineConfig, config.to_dict(again)) == again
    with pytest.raises(ConfigError, match="learner.loss.refine.solverr: unknown key"):
        config.load([], ["learner.loss.refine.solverr=lm"])
    with pytest.raises(ConfigError, match="learner.loss.refine.shifts needs solver"):
        config.load([], ["learner.loss.refine.shifts=true", "learner.loss.refine.solver=lm"])


def test_keyword_defaults_are_the_config_defaults():
    """ARCHITECTURE.md, "One default per option": a function's keyword for a config setting reads
    its default from the dataclass, or has none (its callers pass the config's value)."""
    import inspect

    from labelers.config import LabelerConfig
    from labelers.depth import make_teacher
    from learner.config import LossConfig, RefineConfig
    from learner.refinement import refine_geometry
    from replay.config import ReplayConfig
    from replay.rate_limiter import RateLimiter

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    replay, limiter = ReplayConfig(), RateLimiter()
    assert (limiter.min_size, limiter.samples_per_insert, limiter.tolerance, limiter.limit_inserts) == \
        (replay.min_size, replay.samples_per_insert, replay.tolerance, replay.limit_inserts)
    refine, terms, got = RefineConfig(), LossConfig(), defaults(refine_geometry)
    assert {k: got[k] for k in ("steps", "lr", "solver", "scales", "shifts")} == \
        {k: getattr(refine, k) for k in ("steps", "lr", "solver", "scales", "shifts")}
    assert {k: got[k] for k in ("reproj_weight", "point_weight", "robust", "scale_deg")} == \
        {k: getattr(terms, k) for k in ("reproj_weight", "point_weight", "robust", "scale_deg")}
    assert got["compiled"] is inspect.Parameter.empty  # RefineConfig.compile, passed by the objective
    labeler, got = LabelerConfig(), defaults(make_teacher)
    assert {k: got[k] for k in ("device", "batch_frames", "precision", "compile")} == \
        {k: getattr(labeler, k) for k in ("device", "batch_frames", "precision", "compile")}


@pytest.mark.parametrize("overrides, uses", [
    ([], False), (["labeler.teacher=none"], False), (["labeler.teacher=embedded:/w"], False),
    (["labeler.teacher=oracle"], True), (["labeler.teacher=oracle?strength=1"], True),
    (["labeler.teacher=oracle-gt"], True), (["labeler.teacher=oracle-gt?noise=0"], True),
    (["learner.loss.kind=supervised"], True)])
def test_the_streamer_reads_ground_truth_only_for_a_stage_that_trains_on_it(overrides, uses):
    assert load([], overrides).trains_on_ground_truth is uses


@pytest.mark.parametrize("overrides, share", [
    ([], 1.0), (["labeler.teacher=none"], 1.0), (["labeler.teacher=embedded:/w"], 1.0),
    (["labeler.teacher=oracle"], 0.0), (["labeler.teacher=oracle-gt?noise=0.1&holes=0"], 0.0),
    (["labeler.teacher=oracle?strength=1"], 1.0), (["labeler.teacher=oracle?warp=0.1"], 1.0),
    (["labeler.teacher=oracle", "learner.loss.match_shape_weight=1"], 1.0),
    (["learner.loss.match_shape_weight=0.3"], 0.3)])
def test_the_match_terms_share_of_the_shape_is_chosen_by_the_teacher(overrides, share):
    """``learner.loss.match_shape_weight`` unset: 0 for a teacher with an exact shape (the oracle
    without structured errors), 1 for every other; a value set is kept."""
    assert load([], overrides).learner.loss.match_shape_weight == share


def test_a_bad_oracle_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown options"):
        load([], ["labeler.teacher=oracle?sharpness=1"])


@pytest.mark.parametrize("spec", ["embeded", "Embedded", "oracles", "onnx", "model.onnx", "weights.pt", "foo:bar",
                                  "none?x", "embedded?x"])
def test_an_unknown_teacher_is_refused_at_load_naming_the_key_and_the_accepted_forms(spec):
    """``labeler.teacher=embeded`` loaded: the labeler refused it only once ``up`` had started
    the streamer and the rest. Only the spec's form is checked (no weights loaded)."""
    with pytest.raises(ConfigError, match=r"^labeler\.teacher") as err:
        load([], [f"labeler.teacher={spec}"])
    for form in ("none", "oracle", "oracle-gt", "embedded[:<weights", "hf:<", "onnx:<", "torchscript:<",
                 "tflite:<", "pydnet:<"):
        assert form in str(err.value), (form, str(err.value))


@pytest.mark.parametrize("spec", ["none", "embedded", "oracle", "oracle-gt?noise=0", "oracle?strength=1",
                                  "embedded:/not/here/w.safetensors", "hf:depth-anything/Depth-Anything-V2-Small-hf",
                                  "onnx:/not/here.onnx?space=disparity", "torchscript:m.pt?space=depth",
                                  "tflite:m.tflite?space=depth", "pydnet:/not/here/pydnet++.tflite"])
def test_every_teacher_form_loads_without_its_weights(spec):
    """A file or folder is not looked for at load (like ``learner.init`` and the devices: a config
    written on one host often runs on another); the labeler says a missing one when it starts."""
    assert load([], [f"labeler.teacher={spec}"]).labeler.teacher == spec


def test_an_unknown_matcher_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"labeler\.matcher: 'surf' is not one of"):
        load([], ["labeler.matcher=surf"])


def test_a_bad_oracle_option_is_refused_at_load_whatever_the_match_shape_weight():
    """The oracle's options were checked only where ``learner.loss.match_shape_weight`` was left
    to the teacher (which builds the oracle to ask its shape); set, a typo loaded."""
    for extra in ([], ["learner.loss.match_shape_weight=1"]):
        with pytest.raises(ConfigError, match=r"^labeler\.teacher 'oracle\?sharpness=1': unknown options"):
            load([], ["labeler.teacher=oracle?sharpness=1", *extra])


def _frames(folder: Path, count: int = 3, *, depth: bool = False, pose: bool = False,
            name: str = "frame-{:06d}.color.png", stem: str = "frame-{:06d}") -> Path:
    """An image folder of ``count`` real PNG frames, each with a 7-Scenes depth map and pose file
    beside it where asked."""
    import numpy as np

    from reliev3r.imaging import write_image

    folder.mkdir(parents=True)
    for k in range(count):
        assert write_image(folder / name.format(k), np.full((24, 32, 3), 40 * k, np.uint8))
        if depth:
            assert write_image(folder / f"{stem.format(k)}.depth.png", np.full((24, 32), 1500, np.uint16))
        if pose:
            (folder / f"{stem.format(k)}.pose.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    return folder


def test_a_run_that_trains_on_ground_truth_is_refused_only_where_no_source_can_carry_it(tmp_path):
    """With ``learner.loss.kind=supervised`` (depth and pose) or the oracle teacher (depth), the
    streamer skips every window without that ground truth (``no_ground_truth``): where no source
    could ever carry it (a live feed, a video without the synthetic world's ``.gt.npz``, an image
    folder without 7-Scenes' files beside its frames or a ScanNet scene's, a TUM folder, whose
    ``depth/`` and ``groundtruth.txt`` the streamer does not read) the run started, streamed nothing
    and its learner waited for ever. ``PipelineConfig.ground_truth_problem`` says so in a line
    naming ``streamer.sources``, each source and why; one source that may carry it (or a folder not
    there yet, one with nothing in it yet, a glob that matches nothing: a watched folder may fill)
    lets the run start."""
    from reliev3r import synthetic
    from streamer.config import SyntheticConfig
    from streamer_media import encode, panning_frames

    plain = _frames(tmp_path / "plain")
    depth_only = _frames(tmp_path / "depth only", depth=True)
    posed = _frames(tmp_path / "posed", depth=True, pose=True)
    tum = _frames(tmp_path / "tum" / "rgb", name="{}.png").parent
    _frames(tum / "depth", name="{}.png")
    (tum / "groundtruth.txt").write_text("# timestamp tx ty tz qx qy qz qw\n0 0 0 0 0 0 0 1\n")
    scannet = _frames(tmp_path / "scene0000_00" / "color", name="{}.jpg").parent
    (scannet / "intrinsic").mkdir()
    for camera in ("color", "depth"):
        (scannet / "intrinsic" / f"intrinsic_{camera}.txt").write_text("500 0 16 0\n0 500 12 0\n0 0 1 0\n0 0 0 1\n")
    _frames(scannet / "depth", name="{}.png")
    (scannet / "pose").mkdir()
    (scannet / "pose" / "0.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = encode(videos / "clip.mp4", panning_frames(4))
    world = synthetic.ensure_world(tmp_path / "world", SyntheticConfig(scenes=1, frames=4, height=16, width=16),
                                   progress=False)[0]
    empty, later = tmp_path / "empty", tmp_path / "not yet"
    empty.mkdir()
    live = ["rtsp://cam1/stream", "http://cam2:8080/video", "udp://0.0.0.0:5000", "/dev/video0"]

    def problem(sources: list, *overrides: str) -> str | None:
        quoted = ", ".join(f"'{s}'" for s in sources)
        return load([], [f"streamer.sources=[{quoted}]", *overrides]).ground_truth_problem()

    supervised, oracle = "learner.loss.kind=supervised", "labeler.teacher=oracle"
    said = problem([*live, str(plain), str(clip), str(videos), str(tum), str(videos / "*.mp4")], supervised)
    assert said is not None and len(said.splitlines()) == 1, said
    assert said.startswith("streamer.sources carry none of the ground truth learner.loss.kind=supervised trains "
                           "on (depth and pose of every view): "), said
    for spec in live:
        assert f"{spec}: a live feed, whose frames carry none; " in said, said
    assert (f"{plain}: an image folder with no depth map ({plain}/<frame>.depth.png) nor pose "
            f"({plain}/<frame>.pose.txt) of any frame; ") in said, said
    assert f"{clip}: a video without the synthetic world's clip.gt.npz beside it; " in said, said
    assert f"{videos}: a folder whose 1 video has no <name>.gt.npz beside it; " in said, said
    assert f"{tum}: an image folder with no depth map ({tum}/rgb/<frame>.depth.png) nor pose " in said, said
    assert f"{videos / '*.mp4'}: {clip}: a video without" in said, said
    assert said.endswith("every window would be skipped (no_ground_truth) and the learner would wait for ever"), said
    said = problem([str(depth_only)], "labeler.teacher=oracle?strength=1")
    assert said is None, said  # the oracle labels from depth alone
    said = problem([str(depth_only)], supervised)
    assert said is not None and said.startswith(
        f"streamer.sources carry none of the ground truth learner.loss.kind=supervised trains on (depth and pose "
        f"of every view): {depth_only}: an image folder with no pose ({depth_only}/<frame>.pose.txt) of any frame. ")
    said = problem(live[:1], oracle)
    assert said is not None and said.startswith(
        "streamer.sources carry none of the ground truth labeler.teacher=oracle labels from (depth of every view): "
        "rtsp://cam1/stream: a live feed"), said
    for carrier in (posed, scannet, world, world.parent, later, empty, tmp_path / "none yet" / "*.mp4"):
        for overrides in ([supervised], [oracle]):
            assert problem([*live, str(plain), str(clip), str(carrier)], *overrides) is None, (carrier, overrides)
    assert problem([*live, str(plain)]) is None  # a run that trains on no ground truth
    assert load([], [supervised]).ground_truth_problem() is None  # the synthetic world
