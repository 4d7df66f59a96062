"""Window augmentation (learner.augment) on the synthetic world with exact geometry: a mirrored
window is the window of the mirrored world, so every loss of the objective takes the same value
on a mirrored prediction and batch; colour jitter touches images only."""

from types import SimpleNamespace

import pytest
import torch

from learner.augment import augment_batch, flip_windows, jitter_colors, mirror_pose
from learner.config import AugmentConfig, LearnerConfig, LossConfig
from learner.objective import weighted_loss
from reliev3r import geometry
from tests.helpers_world import F64, make_world, perturbed


def _batch(world, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, v, h, w = world["depth"].shape
    k = world["matches"].shape[0]
    teacher = world["depth"] * torch.exp(0.1 * torch.randn(world["depth"].shape, generator=g, dtype=F64))
    return {
        "images": torch.rand(b, v, 3, h, w, generator=g, dtype=F64),
        "intrinsics": world["intrinsics"],
        "matches": torch.cat((world["matches"], 0.5 + 0.5 * torch.rand(k, 1, generator=g, dtype=F64)), dim=1),
        "match_triangulation": torch.cat((1 + 3 * torch.rand(k, 2, generator=g, dtype=F64),
                                          torch.rand(k, 1, generator=g, dtype=F64)), dim=1),
        "teacher_depth": teacher,
        "teacher_valid": torch.rand(b, v, h, w, generator=g) > 0.1,
        "gt_depth": world["depth"],
        "gt_cam_to_world": world["cam_to_world"],
    }


def _pred(depth, poses, seed: int):
    g = torch.Generator().manual_seed(seed)
    confidence = 0.5 + torch.rand(depth.shape, generator=g, dtype=F64)
    return SimpleNamespace(depth=depth, confidence=confidence, cam_to_world=poses)


def _mirrored(pred, flip):
    sel = flip.view(-1, 1, 1, 1)
    return SimpleNamespace(depth=torch.where(sel, pred.depth.flip(-1), pred.depth),
                           confidence=torch.where(sel, pred.confidence.flip(-1), pred.confidence),
                           cam_to_world=torch.where(flip.view(-1, 1, 1, 1), mirror_pose(pred.cam_to_world),
                                                    pred.cam_to_world))


def test_a_mirrored_point_projects_to_the_mirrored_pixel():
    world = make_world(3, batch=1)
    width = world["depth"].shape[-1]
    K, T = world["intrinsics"][0, 1], world["cam_to_world"][0, 1]
    point = torch.tensor([[0.3, -0.2, 4.1]], dtype=F64)
    uv, _ = geometry.project(geometry.transform_points(geometry.invert_pose(T), point), K)
    flipped = flip_windows({"images": torch.zeros(1, 1, 3, 2, width, dtype=F64), "intrinsics": K[None, None],
                            "matches": torch.zeros(0, 8, dtype=F64)}, torch.tensor([True]))
    mirrored = point * torch.tensor([-1.0, 1.0, 1.0], dtype=F64)
    uv2, _ = geometry.project(geometry.transform_points(geometry.invert_pose(mirror_pose(T)), mirrored),
                              flipped["intrinsics"][0, 0])
    assert torch.allclose(uv2[0], torch.stack((width - 1 - uv[0, 0], uv[0, 1])), atol=1e-12)
    assert torch.allclose(torch.linalg.det(mirror_pose(T)[:3, :3]), torch.ones((), dtype=F64))


@pytest.mark.parametrize("kind", ["weak", "supervised"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_loss_is_the_same_on_a_mirrored_window(kind, seed):
    world = make_world(20 + seed, batch=2)
    batch = _batch(world, seed)
    depth, poses = perturbed(world, seed)
    pred = _pred(depth, poses, seed)
    cfg = LossConfig(kind=kind)
    loss, terms = weighted_loss(pred, batch, cfg)
    assert loss.item() > 1e-3
    flip = torch.tensor([True, False]) if seed == 0 else torch.tensor([True, True])
    loss2, terms2 = weighted_loss(_mirrored(pred, flip), flip_windows(batch, flip), cfg)
    assert set(terms) == set(terms2) and len(terms) > 2
    for name in terms:  # float64 throughout: equal up to rounding
        assert float(terms2[name]) == pytest.approx(float(terms[name]), rel=1e-9, abs=1e-12), name


def test_mirroring_twice_gives_the_window_back():
    world = make_world(5, batch=2)
    batch = _batch(world, 5)
    flip = torch.tensor([True, False])
    back = flip_windows(flip_windows(batch, flip), flip)
    assert set(back) == set(batch)
    for name, value in batch.items():  # W - 1 - (W - 1 - x) rounds for fractional x
        assert torch.equal(back[name], value) if name != "matches" else torch.allclose(back[name], value), name
    once = flip_windows(batch, flip)
    assert torch.equal(once["images"][1], batch["images"][1]) and not torch.equal(once["images"][0], batch["images"][0])


def test_colour_jitter_stays_in_range_changes_images_only_and_is_off_at_zero():
    world = make_world(6, batch=2)
    batch = _batch(world, 6)
    torch.manual_seed(0)
    out = augment_batch(batch, AugmentConfig(color=0.4))
    assert out["images"].min() >= 0 and out["images"].max() <= 1 and not torch.equal(out["images"], batch["images"])
    assert all(out[k] is batch[k] for k in batch if k != "images")
    assert torch.allclose(jitter_colors(batch["images"], 0.0), batch["images"], rtol=0, atol=1e-12)  # rounding only
    assert augment_batch(batch, AugmentConfig()) is batch


def test_augment_config_is_checked():
    with pytest.raises(ValueError, match="augment"):
        AugmentConfig(flip=1.5)
    with pytest.raises(ValueError, match="augment"):
        AugmentConfig(color=-0.1)
    assert LearnerConfig().augment == AugmentConfig()  # off unless asked for


def test_a_trainer_step_sees_the_augmented_batch_and_leaves_the_callers_untouched():
    from learner.train import Trainer, synthetic_batch
    from tests.helpers_train import learner_cfg

    trainer = Trainer(learner_cfg(augment=AugmentConfig(flip=1.0, color=0.3)), device="cpu")
    batch = synthetic_batch(2, 2, 32, 32, k=32, seed=0)
    before = {k: v.clone() for k, v in batch.items()}
    seen = []
    trainer.loss_fn = lambda pred, b, cfg, teacher_space: (seen.append(b) or (pred.depth.mean(), {}))
    out = trainer.step(batch)
    assert out["skipped"] == 0.0 and len(seen) == 1
    assert 0 <= seen[0]["images"].min() and seen[0]["images"].max() <= 1
    assert torch.equal(seen[0]["matches"][:, 3], 31 - batch["matches"][:, 3])  # every window mirrored
    assert all(torch.equal(batch[k], before[k]) for k in batch)


def test_the_self_target_is_the_frozen_ema_depth_and_survives_a_snapshot(tmp_path):
    """``self_target_step``: from that step the depth term compares the prediction with the depth
    of the weights frozen then (the EMA copy) on the same window; a resumed trainer has them."""
    from learner.snapshot import restore_trainer, save_snapshot
    from learner.train import Trainer, synthetic_batch
    from tests.helpers_train import learner_cfg

    cfg = learner_cfg(self_target_step=2)
    trainer = Trainer(cfg, device="cpu")
    seen = []
    trainer.loss_fn = lambda pred, b, c, teacher_space: (seen.append((b, teacher_space)) or (pred.depth.mean(), {}))
    batches = [synthetic_batch(2, 2, 32, 32, k=32, seed=s) for s in range(4)]
    for batch in batches[:2]:
        trainer.step(batch, teacher_space="disparity")
    assert trainer.target is None and all(b["teacher_depth"] is batch["teacher_depth"] for (b, _), batch
                                          in zip(seen, batches))
    frozen = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    trainer.step(batches[2], teacher_space="disparity")
    assert all(torch.equal(v, frozen[k]) for k, v in trainer.target.state_dict().items())
    with torch.no_grad():
        expected = trainer.target(batches[2]["images"]).depth
    assert torch.allclose(seen[2][0]["teacher_depth"], expected) and seen[2][1] == "depth"
    trainer.step(batches[3])
    assert all(torch.equal(v, frozen[k]) for k, v in trainer.target.state_dict().items())  # frozen, not the EMA
    path = save_snapshot(trainer, tmp_path / "snapshots")
    resumed = Trainer(cfg, device="cpu")
    restore_trainer(resumed, path)
    assert all(torch.equal(v, frozen[k]) for k, v in resumed.target.state_dict().items())
