"""The ``reliev3r`` command line: one subcommand per process, plus the local supervisor.

Every subcommand takes ``--config FILE`` (repeatable, later files win) and ``key.sub=value``
overrides anywhere among its options, e.g. ``reliev3r up learner.lr=1e-3 --max-steps 50 streamer.views=8``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import os
import re
import sys
from pathlib import Path

from reliev3r import config as rconfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
PRETRAIN_CONFIG = DEFAULT_CONFIG.parent / "pretrain.yaml"
"""``reliev3r pretrain``'s recipe, loaded after the defaults and before the user's files."""

# subcommand -> (module with run(cfg, runtime) -> int, stage name)
STAGES = {
    "stream": ("streamer.service", "streamer"),
    "label": ("labelers.service", "labeler"),
    "replay": ("replay.service", "replay"),
    "learn": ("learner.service", "learner"),
    "evaluate": ("evaluation.service", "evaluator"),
}


def at_least(low: int):
    """An argparse type: an integer of at least ``low`` (0 read as "the default" before)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more (a negative one was taken as 0,
    ``inf`` as a wait without end)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reliev3r", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="YAML config on top of configs/default.yaml (repeatable, later files win)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        return p

    up = add("up", "run the whole pipeline locally (supervisor + every stage)")
    up.add_argument("--max-steps", type=at_least(0), default=None,
                    help="end after N learner steps (default: learner.max_steps; 0: never)")
    pre = add("pretrain", "up with configs/pretrain.yaml (supervised, synthetic world): weights for learner.init")
    pre.add_argument("--max-steps", type=at_least(0), default=None,
                     help="end after N learner steps (default: the recipe's; 0: never)")
    add("stream", "run the streamer: sources -> frame windows")
    add("label", "run a labeler worker: windows -> teacher labels -> replay")
    add("replay", "run the replay service")
    add("learn", "run the learner (under torchrun for several ranks)")
    add("evaluate", "run the evaluator process that scores each new snapshot")
    ev = add("eval", "evaluate a snapshot on a dataset and print the table")
    ev.add_argument("--checkpoint", required=True, help="snapshot folder or run folder (newest snapshot)")
    ev.add_argument("--data", default=None, help="dataset spec: synthetic, synthetic:DIR, 7scenes:DIR[@A-B], "
                    "scannet:DIR[@A-B], folder:DIR[@A-B] or DIR (default: evaluator.data; here and below, of the "
                    "run's config.yaml unless --config is given)")
    ev.add_argument("--views", type=at_least(2), default=None, help="views per window (default: streamer.views)")
    ev.add_argument("--windows", type=at_least(1), default=None,
                    help="windows to evaluate (default: evaluator.windows)")
    ev.add_argument("--out", default=None,
                    help="folder for the JSON and markdown results (default: eval/ in the checkpoint's run folder)")
    ev.add_argument("--compare", action="append", default=[], metavar="PATH",
                    help="another snapshot to score beside it (repeatable), e.g. the supervised sibling")
    ev.add_argument("--teacher", action="append", default=[], metavar="SPEC",
                    help="depth teacher baseline (repeatable; default: labeler.teacher, and the teacher a "
                         "refresh of the run wrote; none: no teacher row), e.g. oracle, "
                         "pydnet:../shared/models/pydnet++.tflite")
    rec = add("reconstruct", "video or image folder -> point cloud (PLY), poses (TUM), depth PNGs, trajectory plot")
    rec.add_argument("--checkpoint", required=True, help="snapshot folder or run folder (newest snapshot)")
    rec.add_argument("--input", required=True, help="video file or image folder, or a quoted glob matching one "
                     "(expanded as streamer.sources' are)")
    rec.add_argument("--out", required=True, help="output folder")
    for flag, kind, help_ in (("--views", at_least(2), "frames per window (8)"),
                              ("--stride", at_least(1), "input frames between picked frames (1)"),
                              ("--overlap", at_least(1), "frames shared by consecutive windows, below --views (2)"),
                              ("--max-frames", at_least(2), "frames picked at most (300)"),
                              ("--keep-fraction", float, "most confident fraction of each frame's pixels kept (0.5)"),
                              ("--min-confidence", float, "confidence floor in [0, 2) (0)")):
        rec.add_argument(flag, type=kind, default=None, help=help_)
    rec.add_argument("--intrinsics", default=None, help="3x3 (or fx fy cx cy) text file of the frames as recorded "
                     "(turned with a video's display rotation or the images' Exif orientation); "
                     "default 60 degree FoV")
    rec.add_argument("--gt-poses", default=None, help="TUM trajectory of the input, matched as a folder's own "
                     "(by timestamp within 20 ms, else by order; a line that is no pose leaves its frame out of "
                     "the ATE, saying so)")
    rec.add_argument("--device", default="auto",
                     help="auto (cuda where there is one, else cpu), cpu, cuda or cuda:N (auto)")
    rec.add_argument("--colmap", nargs="?", const="bin", choices=("bin", "txt"), default=None,
                     help="also write OUT/colmap/{images,sparse/0} (a COLMAP model; binary unless 'txt')")
    rec.add_argument("--poses", choices=("fitted", "model"), default=None,
                     help="each window's poses: fitted (its first view's from the pose head, every other placed "
                     "by PnP on the window's verified matches lifted by the model's depth; labeler.matcher, "
                     "labeler.ransac_threshold_px, found at 640 px; AUC@30 0.611 against the pose head's 0.146 "
                     "on 7-Scenes: docs/RESULTS.md) or model (the pose head's) (fitted)")
    exp = add("export", "export a snapshot's model for deployment (torch.export .pt2 or ONNX), checked against eager")
    exp.add_argument("--checkpoint", required=True, help="snapshot folder or run folder (newest snapshot)")
    exp.add_argument("--out", default=None, help="output file (.pt2 or .onnx); optional with --colmap")
    exp.add_argument("--format", choices=("torch-export", "onnx"), default=None, help="default: from --out's suffix")
    exp.add_argument("--views", type=at_least(2), default=None, help="views per window (default: streamer.views, "
                     "of the run's config.yaml unless --config is given)")
    exp.add_argument("--height", type=at_least(1), default=None,
                     help="input height (default: the snapshot's; one that records none: streamer.height)")
    exp.add_argument("--width", type=at_least(1), default=None,
                     help="input width (default: the snapshot's; one that records none: streamer.width)")
    exp.add_argument("--colmap", default=None, metavar="DIR",
                     help="write a COLMAP model of every held-out window into DIR/<window>/")
    exp.add_argument("--colmap-format", choices=("bin", "txt"), default="bin", help="COLMAP files (bin)")
    exp.add_argument("--data", default=None, help="held-out dataset spec for --colmap (default: evaluator.data)")
    exp.add_argument("--windows", type=at_least(1), default=None,
                     help="windows for --colmap (default: evaluator.windows)")
    exp.add_argument("--poses", choices=("fitted", "model"), default="fitted",
                     help="--colmap's poses: fitted to the model's depth, as reconstruct's, or model (the pose "
                     "head's) (fitted)")
    render = add("render", "render the synthetic world (video + exact ground truth) into a folder")
    render.add_argument("--out", required=True, help="output folder")
    status = add("status", "print the state of a running pipeline from its metrics endpoints")
    status.add_argument("--run-dir", default=None, help="run folder with processes.json (default: run.dir)")
    status.add_argument("--interval", type=seconds, default=1.0,
                        help="seconds between the two scrapes the rates are measured over (1)")
    keys = add("keys", "generate CURVE key pairs for the ZeroMQ links (network.curve)")
    keys.add_argument("--out", required=True, help="folder for the key files (created, mode 0700)")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    view = add("view", "write a Rerun recording (.rrd) of a run's snapshots or of a reconstruction (extra 'view')")
    view.add_argument("target", help="run folder (snapshots/) or reconstruct output folder (poses.txt)")
    view.add_argument("--out", default=None, help=".rrd file (default: TARGET/view.rrd)")
    view.add_argument("--snapshots", type=at_least(1), default=8, help="a run's snapshots logged at most (8)")
    view.add_argument("--windows", type=at_least(1), default=1, help="held-out windows per snapshot (1)")
    rep = sub.add_parser("report", help="one static HTML page of a run's learning curves and newest pictures")
    rep.add_argument("run", help="run folder (with evaluations/) or an evaluations folder")
    rep.add_argument("--compare", action="append", default=[], metavar="RUN",
                     help="another run on the same charts (repeatable)")
    rep.add_argument("--out", default=None, help="HTML file (default: RUN/report.html)")
    tt = sub.add_parser("teacher-train", help="train the embedded depth teacher on the synthetic world "
                        "(--distill RUN: and on a run's learner depth of real frames)")
    tt.add_argument("--out", required=True, help="folder for the weights, meta and training log")
    tt.add_argument("--steps", type=at_least(1), default=None, help="optimiser steps (20000)")
    tt.add_argument("--device", default=None, help="cpu, cuda or cuda:N (cuda)")
    tt.add_argument("--seed", type=int, default=None, help="random seed (0)")
    tt.add_argument("--time-budget", dest="time_budget_s", type=float, default=None,
                    help="wall-clock seconds for the whole run, rendering included")
    tt.add_argument("options", nargs="*", metavar="key=value",
                    help="other labelers.teacher_train.TeacherTrainConfig fields")
    _distill_arguments(tt)
    return parser


def _distill_arguments(parser: argparse.ArgumentParser) -> None:
    """``reliev3r teacher-train``'s distillation flags (``reliev3r.distill``)."""
    parser.add_argument("--distill", metavar="RUN", default=None,
                        help="distil this run's learner (run, snapshots or snapshot folder) into the teacher")
    parser.add_argument("--frames", action="append", default=None, metavar="SPEC",
                        help="with --distill: frames to predict on (default: the run's streamer.sources); "
                             "a source path, 7scenes:DIR[@A-B], scannet:DIR[@A-B] or folder:DIR[@A-B]; repeatable")
    parser.add_argument("--views", type=at_least(2), default=None,
                        help="with --distill: views per window (the run's)")
    parser.add_argument("--gap", type=at_least(1), default=None,
                        help="with --distill: frames between views (the run's streamer.frame_stride)")
    parser.add_argument("--real-share", type=float, default=0.5,
                        help="with --distill: share of the real frames in each batch (0.5)")
    parser.add_argument("--max-frames", type=at_least(1), default=20000,
                        help="with --distill: real frames taken at most (20000)")


OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)+=")
"""A config override on the command line: a dotted key, then ``=`` (``learner.lr=1e-3``)."""

OPTION = re.compile(r"[A-Za-z_]\w*=")
"""A ``teacher-train`` option on the command line: a field name, then ``=`` (``dining=true``)."""

POSITIONALS = {"view": "target"}
"""Commands with a positional beside the overrides: the one word that is no override."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, overrides anywhere among the options. argparse gives a ``nargs="*"``
    positional one run of words only (an override after an option was refused as unrecognized,
    and ``view RUN key=value`` gave RUN to the overrides): the words it leaves that look like an
    override (:data:`OVERRIDE`) are overrides, in order; anything else left is refused as
    argparse refuses it (exit 2). A command's other positional (:data:`POSITIONALS`) is the word
    that is no override, wherever it stands."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if not hasattr(args, "overrides"):  # report, teacher-train: no overrides to take
        if hasattr(args, "options"):  # teacher-train's key=value options, anywhere among its flags
            args.options += [word for word in rest if OPTION.match(word)]
            rest = [word for word in rest if not OPTION.match(word)]
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args
    name = POSITIONALS.get(args.command)
    if name:  # every word is read again: argparse may have given the positional to the overrides
        words, args.overrides = [*args.overrides, getattr(args, name), *rest], []
    else:  # the words argparse took as overrides stay so (the config says what is wrong with one)
        words = rest
    left: list[str] = []
    for word in words:
        (args.overrides if OVERRIDE.match(word) else left).append(word)
    if name:
        if not left:
            parser.error(f"{args.command}: the following arguments are required: {name}")
        setattr(args, name, left.pop(0))
    if left:
        parser.error(f"unrecognized arguments: {' '.join(left)}")
    return args


def config_paths(args: argparse.Namespace) -> list[Path]:
    """configs/default.yaml first, then the user's files on top: a user's file need only
    hold what differs from the defaults."""
    extra = [Path(p) for p in args.config]
    recipe = [PRETRAIN_CONFIG] if args.command == "pretrain" else []
    return [DEFAULT_CONFIG, *recipe, *(p for p in extra if p.resolve() != DEFAULT_CONFIG)]


def load_config(args: argparse.Namespace) -> rconfig.PipelineConfig:
    return rconfig.load(config_paths(args), args.overrides)


def _pretrained(cfg: rconfig.PipelineConfig, code: int) -> int:
    """``reliev3r pretrain``'s last words: the snapshot to pass as ``learner.init``."""
    from learner.snapshot import latest_snapshot

    snap = latest_snapshot(cfg.run_dir / "snapshots")
    if snap is None:
        print("reliev3r pretrain: no snapshot was written", file=sys.stderr)
        return code or 1
    print(f"pretrained weights: {snap.resolve()}\nstart a run from them with: learner.init={snap.resolve()}")
    return code


PATH_OPTIONS = {
    "reconstruct": (("--intrinsics", "file"), ("--gt-poses", "file"), ("--out", "folder")),
    "eval": (("--out", "folder"),),
    "export": (("--out", "output"), ("--colmap", "folder")),
    "view": (("--out", "output"),),
    "report": (("--out", "output"),),
}
"""Each command's path options by what the path must be: ``file``, a file to read; ``folder``, a
folder to write into (made where it is not there); ``output``, a file to write (no folder there).
Every command's ``--config`` files are files to read. Checked before anything is loaded
(:func:`path_problem`): a wrong one stopped a command in the OS's words, naming no option, once
the model had loaded, or the frames been scored."""


def path_problem(option: str, value: str, kind: str) -> str | None:
    """Why the path ``value`` of ``option`` cannot be what :data:`PATH_OPTIONS` says it must be,
    naming both, or None."""
    path = Path(value)
    if kind == "file":
        if path.is_dir():
            return f"{option} {value}: a folder, not a file"
        return None if path.is_file() else f"{option} {value}: no such file"
    if path.exists():
        if kind == "folder" and not path.is_dir():
            return f"{option} {value}: not a folder"
        if kind == "output" and path.is_dir():
            return f"{option} {value}: a folder, not a file"
        return None
    above = next((p for p in path.parents if p.exists()), None)  # the folders up to it are made
    if above is not None and not above.is_dir():
        return f"{option} {value}: {above} is not a folder"
    return None


def paths_problem(args: argparse.Namespace) -> str | None:
    """The first path option of the command line that :func:`path_problem` refuses, or None."""
    options = [("--config", value, "file") for value in getattr(args, "config", [])]
    for option, kind in PATH_OPTIONS.get(args.command, ()):
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value is not None:
            options.append((option, value, kind))
    return next((problem for option in options if (problem := path_problem(*option))), None)


OFFLINE = frozenset({"eval", "reconstruct", "export", "report", "teacher-train", "keys", "view", "render"})
"""Commands a user runs by hand on files: what stops them is said in a line, not a traceback."""


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints as its own bytes, as ls does
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    args = parse_args(argv)
    if problem := paths_problem(args):  # before any config, model or data is loaded
        print(f"reliev3r {args.command}: {problem}", file=sys.stderr)
        return 2
    try:
        return _command(args, argv)
    except FileNotFoundError as err:  # a wrong --checkpoint, --compare or --distill: said, no traceback
        snapshot = sys.modules.get("learner.snapshot")  # imported by whatever raised it (torch: not here)
        if snapshot is not None and isinstance(err, snapshot.NoSnapshot):
            print(f"reliev3r {args.command}: {err}", file=sys.stderr)
            return 2
        return _stopped(args.command, err)
    except Exception as err:
        return _stopped(args.command, err)
    except KeyboardInterrupt:  # Ctrl-C: said in a line, exit 130 as a shell reports SIGINT
        if args.command not in OFFLINE or os.environ.get("RELIEV3R_DEBUG"):
            raise
        print(f"reliev3r {args.command}: stopped (Ctrl-C)", file=sys.stderr)
        return 130


def _stopped(command: str, err: Exception) -> int:
    """An offline command's error in a line (a wrong path, a bad value, a damaged snapshot or
    teacher: exit 2; anything else: 1); a stage's, or any with ``RELIEV3R_DEBUG=1``, raised."""
    if command not in OFFLINE or os.environ.get("RELIEV3R_DEBUG"):
        raise err
    snapshot = sys.modules.get("learner.snapshot")
    user = isinstance(err, (OSError, ValueError)) or (snapshot is not None and isinstance(err, snapshot.SnapshotError))
    print(f"reliev3r {command}: {err if user else f'{type(err).__name__}: {err}'} "
          "(RELIEV3R_DEBUG=1 shows where)", file=sys.stderr)
    return 2 if user else 1


def _command(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.command == "report":  # needs no pipeline config
        from reliev3r.report import main as report_main

        return report_main(args)
    if args.command == "teacher-train":  # needs no pipeline config
        command = " ".join(["reliev3r", *(sys.argv[1:] if argv is None else argv)])
        if args.distill is not None:
            from reliev3r.distill import distill
            from reliev3r.service import die_with_supervisor

            die_with_supervisor()  # a teacher refresh of `reliev3r up` ends with the run

            return distill(args, command=command)
        if args.frames or args.views or args.gap:
            print("reliev3r teacher-train: --frames, --views and --gap go with --distill RUN", file=sys.stderr)
            return 2
        from labelers.teacher_train import cli_main

        return cli_main(args, command=command)
    try:
        cfg = load_config(args)
    except (rconfig.ConfigError, OSError) as err:
        print(f"reliev3r: config error: {err}", file=sys.stderr)
        return 2
    if args.command in STAGES:
        from reliev3r.service import Runtime

        module, stage = STAGES[args.command]
        # under `up`, the supervisor resolved the ports, read the keys and checked the devices
        if not os.environ.get("RELIEV3R_SUPERVISED"):
            from monitoring.config import RANKED
            from reliev3r.config_base import local_rank
            from reliev3r.ports import BINDS, STAGE_PORTS, stage_problem
            from reliev3r.security import key_problem

            connects = any(port != BINDS.get(stage) for port in STAGE_PORTS[stage])
            if problem := (stage_problem(stage, os.environ.get("RELIEV3R_INSTANCE", stage), cfg)  # LOCAL_RANK first
                           or key_problem(cfg.network.curve, server=stage in BINDS, client=connects)
                           or cfg.device_problem(stage, rank=local_rank() if stage == RANKED else 0)
                           or (cfg.data_problem() if stage == "evaluator" else None)
                           or (cfg.ground_truth_problem() if stage == "streamer" else None)):
                print(f"reliev3r: {problem}", file=sys.stderr)
                return 2
        run = importlib.import_module(module).run
        with Runtime(stage, cfg) as runtime:
            try:
                return run(cfg, runtime)
            except Exception:
                runtime.log.exception("stage failed")
                return 1
    if args.command in ("up", "pretrain"):
        from reliev3r.ports import PortError
        from reliev3r.security import key_problem
        from reliev3r.supervisor import RefreshError, StartError, Supervisor

        if args.max_steps is not None:
            cfg.learner.max_steps = args.max_steps
        if problem := key_problem(cfg.network.curve, server=True, client=True):  # it binds, its children connect
            print(f"reliev3r: {problem}", file=sys.stderr)
            return 2
        try:
            supervisor = Supervisor(cfg)  # resolves the ports: an explicit one in use stops here
        except PortError as err:
            print(f"reliev3r: {err}", file=sys.stderr)
            return 2
        try:
            code = supervisor.run()
        except (RefreshError, StartError) as err:  # a teacher refresh it cannot finish, a learner.init it cannot use
            print(f"reliev3r: {err}", file=sys.stderr)
            return 2
        return _pretrained(cfg, code) if args.command == "pretrain" else code
    if args.command == "eval":
        from evaluation.cli import main as eval_main

        return eval_main(cfg, args)
    if args.command == "reconstruct":
        from reliev3r.reconstruct import main as reconstruct_main

        return reconstruct_main(cfg, args)
    if args.command == "export":
        from reliev3r.export import main as export_main

        if args.colmap:
            from reliev3r.colmap import export_held_out

            status = export_held_out(cfg, args)
            if status or not args.out:
                return status
        elif not args.out:
            print("reliev3r export: say --out FILE (a model export) and/or --colmap DIR", file=sys.stderr)
            return 2
        return export_main(cfg, args)
    if args.command == "view":
        from reliev3r.view import main as view_main

        return view_main(cfg, args)
    if args.command == "render":
        from reliev3r.synthetic import ensure_world

        paths = ensure_world(Path(args.out), cfg.streamer.synthetic)
        print("\n".join(str(p) for p in paths))
        return 0
    if args.command == "status":
        from reliev3r.status import main as status_main

        return status_main(Path(args.run_dir) if args.run_dir else cfg.run_dir, interval=args.interval)
    if args.command == "keys":
        from reliev3r.security import keys_main

        return keys_main(Path(args.out), overwrite=args.force)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
