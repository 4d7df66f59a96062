"""The held-out windows of the issue-9 studies as one CPU batch, for the snapshot diagnostics
(:mod:`studies.refine_targets`, :mod:`studies.depth_offset`): their shared command-line options and loader."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from studies.dataset import LabelledDataset, ensure_dataset, parse_spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The held-out set (sweeps 5-12: 48 windows of seed-1000 scenes, views 12 frames apart),
    its cache, and ``--raw`` (the trained weights instead of the EMA ones)."""
    p.add_argument("--held", default="synthetic:scenes=48,frames=40,seed=1000,hop=4")
    p.add_argument("--stride", type=int, default=12)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--cache", default=".devdata/datasets")
    p.add_argument("--raw", action="store_true", help="the trained weights, not the EMA ones")


def load(args: argparse.Namespace) -> tuple[LabelledDataset, dict[str, torch.Tensor]]:
    """The held-out dataset (labelled with the oracle teacher and SIFT on first use) and all of
    its windows as one batch with every match."""
    spec = parse_spec(args.held, views=args.views, height=args.height, width=args.width, stride=args.stride,
                      teacher="oracle", matcher="sift")
    held = ensure_dataset(spec, args.cache, workers=1)
    return held, held.batch(np.arange(len(held)), torch.device("cpu"), max_matches=0, rng=np.random.default_rng(0))
