"""``studies.aspect``: its geometry, and that its "stretch" row is what ``learner.api`` does."""

import numpy as np
import torch

from learner.api import Reconstructor
from learner.config import ModelConfig
from learner.model import FFRM
from studies import aspect

torch.set_num_threads(1)


def test_crops_and_sizes_known_answers():
    assert aspect.centre_crop(168, 224, 1 / 2) == (70, 0, 84, 168)  # portrait: the full height
    assert aspect.centre_crop(168, 224, 16 / 9) == (0, 21, 224, 126)  # wide: the full width
    assert aspect.centre_crop(168, 224, None) == (0, 0, 224, 168)
    # 6144 pixels at 1:2: 55.4 x 110.9, the sides rounded to multiples of 8
    assert aspect.keep_size(168, 84, 64 * 96, 8) == (112, 56)
    assert aspect.keep_size(126, 224, 64 * 96, 8) == (56, 104)


def test_region_each_way_covers_of_a_portrait_crop():
    """A 168x84 crop into a 64x96 model: fitted as the streamer fits a view, it is resized to
    96x192 and rows 64..127 kept, i.e. input rows 56..112; stretched, output row i has its centre
    at input row (i + 0.5) * 168 / 64, inside 56..112 for rows 21..42."""
    rgb = np.zeros((168, 84, 3), np.uint8)
    depth = np.ones((168, 84), np.float32)
    K = np.array([[100.0, 0, 41.5], [0, 100.0, 83.5], [0, 0, 1]])
    centre = (0.0, 56.0, 84.0, 112.0)
    _, gt, k_cover, mapping = aspect.feed("cover", rgb, depth, K, (64, 96), 8)
    assert gt.shape == (64, 96) and aspect.region_mask(gt.shape, mapping, centre).all()
    # 8/7 the scale, 64 rows cropped off the top: cy = (83.5 + 0.5) * 8 / 7 - 0.5 - 64
    np.testing.assert_allclose(k_cover, [[800 / 7, 0, 42 * 8 / 7 - 0.5], [0, 800 / 7, 84 * 8 / 7 - 64.5], [0, 0, 1]],
                               rtol=1e-6)
    _, gt, _, mapping = aspect.feed("stretch", rgb, depth, K, (64, 96), 8)
    rows = np.flatnonzero(aspect.region_mask(gt.shape, mapping, centre).all(1))
    assert rows.tolist() == list(range(21, 43))


def test_the_stretch_row_feeds_the_model_what_the_api_feeds_it():
    """The study's (a) measures the product: ``Reconstructor.run`` of a portrait array gives the
    depth and intrinsics of the model run on the study's stretched input."""
    torch.manual_seed(0)
    model = FFRM(ModelConfig(size="tiny", patch_size=8)).eval()
    rec = Reconstructor(model, {"image_size": [16, 24]}, torch.device("cpu"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 20, 3), dtype=np.uint8) for _ in range(2)]
    K = np.array([[30.0, 0, 9.5], [0, 30.0, 19.5], [0, 0, 1]])
    out = rec.run(frames, intrinsics=K)
    fed = [aspect.feed("stretch", f, np.ones((40, 20), np.float32), K, (16, 24), 8) for f in frames]
    x = torch.from_numpy(np.stack([f[0] for f in fed])).permute(0, 3, 1, 2).float().div(255.0)[None]
    with torch.no_grad():
        depth = model(x).depth[0].numpy()
    np.testing.assert_array_equal(out["images"], np.stack([f[0] for f in fed]))
    np.testing.assert_allclose(out["depth"], depth, rtol=1e-6)
    np.testing.assert_allclose(out["intrinsics"], np.stack([f[2] for f in fed]), rtol=1e-6)
