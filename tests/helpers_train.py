"""What the learner tests share (test_train, test_snapshot, test_warm_start): a toy objective,
a tiny learner config, a fake replay service on a real socket and a pipeline config for a
learner process fed by it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch

from learner.config import LearnerConfig, ModelConfig
from learner.train import synthetic_batch
from reliev3r import protocol


def toy_loss(pred, batch, cfg, *, teacher_space="depth"):
    """A small stand-in objective touching every head (so DDP sees every parameter used)."""
    depth = (pred.depth.log() - batch["teacher_depth"].log()).abs().mean()
    conf = ((pred.confidence - 1.5) ** 2).mean()
    v = pred.cam_to_world.shape[1]
    target = torch.linspace(0, 0.3, v, device=pred.depth.device)
    pose = ((pred.cam_to_world[..., 0, 3] - target) ** 2).mean()
    loss = depth + conf + pose
    return loss, {"depth": float(depth.detach()), "conf": float(conf.detach()), "pose": float(pose.detach())}


def learner_cfg(**kw) -> LearnerConfig:
    """A tiny model that learns in a few CPU steps (snapshot every step); ``kw`` on top."""
    base = dict(model=ModelConfig(size="tiny", registers=2), lr=2e-3, warmup_steps=2, ema_decay=0.9,
                snapshot_every=1)
    base.update(kw)
    return LearnerConfig(**base)


class FakeReplay:
    """A real ROUTER socket answering ``sample`` like the replay service: first "not_ready",
    then batches of synthetic windows (echoing ``request_id`` as the service does), each batch
    ``delay_s`` after its request; with ``refuse``, that ``error`` reason instead of each batch;
    with ``ground_truth_from``, the batches from that request on carry the supervised sibling's
    ground truth (``gt_depth``, ``gt_cam_to_world``), those before not."""

    def __init__(self, ctx, port: int, *, views: int = 2, h: int = 16, w: int = 16, odd_first: bool = False,
                 delay_s: float = 0.0, first_teacher: dict | None = None, refuse: str | None = None,
                 ground_truth_from: int | None = None):
        import zmq

        self.odd_first, self.base_shape, self.delay_s = odd_first, (views, h, w), delay_s
        self.first_teacher, self.refuse, self.ground_truth_from = first_teacher, refuse, ground_truth_from
        """The teacher meta of the first batch (the later ones: the toy teacher's)."""

        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.shape = (views, h, w)
        self.requests: list[dict] = []
        self.priorities: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _batch(self, b: int, seed: int) -> dict:
        v, h, w = self.shape
        gt = self.ground_truth_from is not None and len(self.requests) >= self.ground_truth_from
        t = synthetic_batch(b, v, h, w, seed=seed, ground_truth=gt)
        arrays = {"frames": (t["images"].permute(0, 1, 3, 4, 2).numpy() * 255).astype(np.uint8),
                  "intrinsics": t["intrinsics"].numpy(), "matches": t["matches"].numpy(),
                  "teacher_depth": t["teacher_depth"].numpy(),
                  "teacher_valid": t["teacher_valid"].numpy().astype(np.uint8)}
        return {**arrays, **{k: t[k].numpy() for k in ("gt_depth", "gt_cam_to_world") if gt}}

    def _loop(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, *frames = self.sock.recv_multipart()
            msg = protocol.decode(frames)
            if msg.kind == "priorities":
                self.priorities.append(dict(msg.meta))
                continue
            self.requests.append(dict(msg.meta))
            rid = msg.meta.get("request_id")
            if len(self.requests) == 1:
                reply = protocol.Message("error", {"reason": "not_ready", "request_id": rid})
            elif self.refuse is not None:
                reply = protocol.Message("error", {"reason": self.refuse, "detail": "as asked", "request_id": rid})
            else:
                b = msg.meta["batch_size"]
                if len(self.requests) == 2 and self.odd_first:
                    self.shape = (self.shape[0], self.shape[1] + 4, self.shape[2])  # not a patch multiple
                elif self.odd_first:
                    self.shape = self.base_shape
                teacher = {"depth": {"name": "toy", "version": "1", "space": "depth"}}
                if len(self.requests) == 2 and self.first_teacher is not None:
                    teacher = self.first_teacher
                meta = {"window_ids": [f"w{i}" for i in range(b)], "request_id": rid, "teacher": teacher}
                reply = protocol.Message("batch", meta, self._batch(b, len(self.requests)))
                self.stop.wait(self.delay_s)
            self.sock.send_multipart([identity, *protocol.encode(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close(linger=0)


def learner_pipeline(tmp_path, port, sampler="uniform", **learner):
    """A pipeline config for a learner process fed by :class:`FakeReplay` on ``port``."""
    from reliev3r.config import NetworkConfig, PipelineConfig, RunConfig
    from replay.config import ReplayConfig

    return PipelineConfig(run=RunConfig(dir=str(tmp_path)), network=NetworkConfig(replay_port=port),
                          replay=ReplayConfig(sampler=sampler), learner=learner_cfg(device="cpu", **learner))


@contextlib.contextmanager
def fake_replay_port() -> Iterator[int]:
    """The port of a :class:`FakeReplay` serving for the block (a learner's ``network.replay_port``)."""
    import zmq

    from reliev3r.config import free_port

    port, ctx = free_port(), zmq.Context()
    replay = FakeReplay(ctx, port)
    try:
        yield port
    finally:
        replay.close()
        ctx.destroy(linger=0)

