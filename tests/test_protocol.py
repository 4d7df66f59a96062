"""The wire format: round trips, and every way a message can be malformed."""

import msgpack
import numpy as np
import pytest

from reliev3r import protocol
from reliev3r.protocol import Message, ProtocolError


def _window(v=3, h=8, w=10):
    rng = np.random.default_rng(0)
    return Message("window", {"window_id": "a:0", "source": "a", "frame_indices": list(range(v))},
                   {"frames": rng.integers(0, 255, (v, h, w, 3), dtype=np.uint8),
                    "intrinsics": np.tile(np.eye(3, dtype=np.float32), (v, 1, 1)),
                    "gt_depth": rng.random((v, h, w), dtype=np.float32)})


def test_round_trip_zero_copy_views():
    msg = _window()
    frames = [bytes(f) for f in protocol.encode(msg)]
    back = protocol.decode(frames)
    assert back.kind == "window" and back.meta == msg.meta
    for k, a in msg.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], a)
        assert not back.arrays[k].flags.writeable  # views on the received buffers
    protocol.self_test()


def test_non_contiguous_arrays_are_sent_contiguous():
    msg = _window()
    msg.arrays["frames"] = np.asfortranarray(msg.arrays["frames"])  # same shape, not C-contiguous
    back = protocol.decode([bytes(f) for f in protocol.encode(msg)])
    np.testing.assert_array_equal(back.arrays["frames"], msg.arrays["frames"])


def _frames(msg):
    return [bytes(f) for f in protocol.encode(msg)]


@pytest.mark.parametrize("mutate, reason", [
    (lambda f: f[:1], "too_few_frames"),
    (lambda f: [b"XXXX", *f[1:]], "bad_magic"),
    (lambda f: [b"R3W\x09", *f[1:]], "bad_version"),
    (lambda f: [f[0], b"\xc1garbage", *f[2:]], "bad_header"),
    (lambda f: f[:-1], "frame_count"),
    (lambda f: [*f[:2], f[2][:-1], *f[3:]], "size_mismatch"),
    (lambda f: [f[0], msgpack.packb({"kind": "nope", "meta": {}, "arrays": []}), ], "unknown_kind"),
    (lambda f: [f[0], msgpack.packb({"kind": "window", "meta": {}, "arrays": []})], "missing_meta"),
    (lambda f: [f[0], msgpack.packb({"kind": "stats", "meta": {}, "arrays": [["x", "object", [1]]]}), b"1"],
     "bad_dtype"),
    (lambda f: [f[0], msgpack.packb({"kind": "stats", "meta": {}, "arrays": [["x", "uint8", [-1]]]}), b""],
     "bad_shape"),
])
def test_malformed_messages_are_rejected_with_reason(mutate, reason):
    with pytest.raises(ProtocolError) as err:
        protocol.decode(mutate(_frames(_window())))
    assert err.value.reason == reason


def _raw(kind, specs, buffers, meta=None):
    header = msgpack.packb({"kind": kind, "meta": meta or {}, "arrays": specs}, use_bin_type=True)
    return [protocol.MAGIC, header, *buffers]


@pytest.mark.parametrize("kind, spec, buf, reason", [
    ("stats", ["x", "uint8", [1] * 65], b"\x00", "bad_shape"),  # more dimensions than numpy takes
    ("stats", ["x", "float64", [0, 1 << 39, 1 << 39]], b"", "unknown_array"),  # refused before it is built
    ("window", ["frames", "uint8", [0, 1 << 39, 1 << 39, 3]], b"", "bad_shape"),  # empty, too big for numpy
    ("window", ["frames", "uint8", [1] * 5], b"\x00", "bad_array"),  # a known array of the wrong ndim
    ("window", ["frames", "uint8", [0, 1 << 39, 1 << 39, 1, 1]], b"", "bad_array"),
])
def test_absurd_shapes_are_protocol_errors_not_numpy_errors(kind, spec, buf, reason):
    """A shape numpy cannot build (more than its 64 dimensions, or an empty array whose other
    sides overflow its size) is a malformed message like any other: a named reason, never a
    numpy ``ValueError`` that would end the receiving process."""
    meta = {"window_id": "a:0", "source": "a", "frame_indices": [0]} if kind == "window" else {}
    with pytest.raises(ProtocolError) as err:
        protocol.decode(_raw(kind, [spec], [buf], meta))
    assert err.value.reason == reason


def test_decode_raises_nothing_but_protocol_errors_on_random_specs():
    """Shapes of every length up to 70 with sides from empty to the bound, for array names the
    schema knows and does not: decode either returns or raises :class:`ProtocolError`."""
    rng = np.random.default_rng(0)
    sides = [0, 1, 2, 3, 7, 1 << 20, 1 << 39, (1 << 40) - 1]
    meta = {"window_id": "a:0", "source": "a", "frame_indices": [0], "teacher": {}, "batch_size": 1,
            "window_ids": ["a:0"]}
    for _ in range(500):
        kind = str(rng.choice(["stats", "window", "insert", "batch"]))
        name = str(rng.choice(["x", "frames", "intrinsics", "matches", "teacher_depth", "frames_encoded"]))
        dtype = str(rng.choice(["uint8", "float32", "float64"]))
        shape = [int(rng.choice(sides)) for _ in range(int(rng.integers(0, 71)))]
        size = np.prod(shape, dtype=object) * np.dtype(dtype).itemsize if shape else np.dtype(dtype).itemsize
        buf = b"\x00" * size if size <= 64 else b""
        try:
            protocol.decode(_raw(kind, [[name, dtype, shape]], [buf], meta))
        except ProtocolError:
            pass


def test_schema_checks_shapes_and_values():
    msg = _window()
    msg.arrays["intrinsics"] = np.ones((2, 3, 3), np.float32)  # V mismatch
    with pytest.raises(ProtocolError, match="bad_shape"):
        protocol.decode(_frames(msg))
    msg = _window()
    msg.arrays["frames"] = msg.arrays["frames"].astype(np.float32)
    with pytest.raises(ProtocolError, match="bad_array"):
        protocol.decode(_frames(msg))
    msg = _window()
    msg.arrays["intrinsics"][0, 0, 0] = np.nan
    with pytest.raises(ProtocolError, match="non_finite"):
        protocol.decode(_frames(msg))
    ins = _window()
    ins.kind = "insert"
    ins.meta["teacher"] = {}
    ins.arrays["matches"] = np.array([[0, 5, 1, 1, 2, 2, 1]], np.float32)  # view 5 of 3
    with pytest.raises(ProtocolError, match="bad_index"):
        protocol.decode(_frames(ins))


def _insert(v=3, h=8, w=10, matches=((0, 1, 1, 1, 2, 2, 1),)):
    ins = _window(v, h, w)
    ins.kind = "insert"
    ins.meta["teacher"] = {}
    ins.arrays["matches"] = np.array(matches, np.float32).reshape(-1, 7)
    return ins


def _batch(ins):
    """``ins`` as a batch of one window, as the replay stacks it."""
    arrays = {k: v[None] for k, v in ins.arrays.items() if k != "matches"}
    arrays["matches"] = np.concatenate((np.zeros((len(ins.arrays["matches"]), 1), np.float32),
                                        ins.arrays["matches"]), 1)
    return Message("batch", {"window_ids": ["a:0"]}, arrays)


@pytest.mark.parametrize("row, value", [
    ((0, 0), 0.0), ((1, 1), 0.0), ((0, 0), -1.0), ((1, 1), -1e-3),  # fx, fy not > 0
    ((2, 0), 1e-3), ((2, 1), -2.0), ((2, 2), 0.0), ((2, 2), 2.0),  # last row not [0, 0, 1]
])
def test_intrinsics_that_cannot_be_a_camera_are_refused(row, value):
    """Finite but impossible intrinsics (all zero, a focal length <= 0, a last row other than
    [0, 0, 1]) make every loss on the window non-finite: refused on receipt, in a window, an
    insert and a batch alike."""
    for kind in ("window", "insert", "batch"):
        msg = _insert()
        msg.arrays["intrinsics"] = msg.arrays["intrinsics"].copy()
        msg.arrays["intrinsics"][1][row] = value
        if kind == "window":
            msg = Message("window", msg.meta, {k: a for k, a in msg.arrays.items() if k != "matches"})
        elif kind == "batch":
            msg = _batch(msg)
        with pytest.raises(ProtocolError) as err:
            protocol.decode(_frames(msg))
        assert err.value.reason == "bad_intrinsics", kind
    zero = _window()
    zero.arrays["intrinsics"] = np.zeros((3, 3, 3), np.float32)
    with pytest.raises(ProtocolError, match="bad_intrinsics"):
        protocol.decode(_frames(zero))
    skewed = _window()  # a skew and a principal point anywhere are a camera
    skewed.arrays["intrinsics"] = np.tile(np.array([[500, 3, -40], [0, 480, 900], [0, 0, 1]], np.float32), (3, 1, 1))
    protocol.decode(_frames(skewed))


def test_matches_outside_their_frames_are_refused_and_those_at_the_border_kept():
    """Pixel centres sit at integer coordinates, so a frame of W x H pixels covers [-0.5, W - 0.5]
    x [-0.5, H - 0.5]; the matchers place keypoints on or inside the outermost centres. A match
    up to ``MATCH_MARGIN_PX`` beyond the frame's edge is kept; one further out (a coordinate of
    1e30 makes every step that draws the window non-finite) is refused, in an insert and a batch."""
    h, w, margin = 8, 10, protocol.MATCH_MARGIN_PX
    edge_lo, edge_x, edge_y = -0.5 - margin, w - 0.5 + margin, h - 0.5 + margin
    kept = [(0, 1, 0, 0, w - 1, h - 1, 1), (0, 1, w - 1, h - 1, 0, 0, 1), (1, 2, -0.5, -0.5, w - 0.5, h - 0.5, 1),
            (2, 0, edge_lo, edge_lo, edge_x, edge_y, 1)]
    for make in (_insert, lambda **kw: _batch(_insert(**kw))):
        protocol.decode(_frames(make(h=h, w=w, matches=kept)))
        for column, value in ((2, 1e30), (3, -1e30), (4, edge_x + 0.01), (5, edge_y + 0.01), (2, edge_lo - 0.01),
                              (5, edge_lo - 0.01), (3, h + 3.0)):
            row = [0, 1, 3, 3, 4, 4, 1]
            row[column] = value
            with pytest.raises(ProtocolError) as err:
                protocol.decode(_frames(make(h=h, w=w, matches=[*kept, row])))
            assert err.value.reason == "match_outside_frame", (column, value)


def test_size_limit_and_kind_filter():
    frames = _frames(_window())
    with pytest.raises(ProtocolError, match="too_large"):
        protocol.decode(frames, max_bytes=100)
    with pytest.raises(ProtocolError, match="unexpected_kind"):
        protocol.decode(frames, kinds=("insert",))


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def _smooth_window(v=3, h=48, w=64):
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([128 + 100 * np.sin(xx / 7 + k), 128 + 100 * np.cos(yy / 9),
                                 128 + 90 * np.sin((xx + yy) / 11)], -1) for k in range(v)]).astype(np.uint8)
    msg = _window(v, h, w)
    msg.arrays["frames"] = frames
    return msg


@pytest.mark.parametrize("codec", ["jpeg", "png"])
def test_compressed_frames_round_trip(codec):
    msg = _smooth_window()
    small = protocol.compress_frames(msg, codec, quality=95)
    assert "frames" not in small.arrays and small.arrays["frames_encoded"].ndim == 1
    back = protocol.decode(_frames(small))
    assert back.arrays["frames"].shape == msg.arrays["frames"].shape
    if codec == "png":
        np.testing.assert_array_equal(back.arrays["frames"], msg.arrays["frames"])  # lossless
    else:
        assert _psnr(back.arrays["frames"], msg.arrays["frames"]) > 30
        assert small.arrays["frames_encoded"].nbytes < msg.arrays["frames"].nbytes / 4
    np.testing.assert_array_equal(back.arrays["gt_depth"], msg.arrays["gt_depth"])


def test_compressed_frames_are_validated():
    good = protocol.compress_frames(_smooth_window(), "jpeg")
    cases = []
    bad = Message(good.kind, {**good.meta, "frame_codec": "gif"}, good.arrays)
    cases.append((bad, "bad_codec"))
    bad = Message(good.kind, {**good.meta, "frame_sizes": good.meta["frame_sizes"][:-1]}, good.arrays)
    cases.append((bad, "size_mismatch"))
    bad = Message(good.kind, {**good.meta, "frame_shape": [3, 48, 65, 3]}, good.arrays)
    cases.append((bad, "bad_image"))
    garbage = good.arrays["frames_encoded"].copy()
    garbage[: garbage.size // 2] = 7
    cases.append((Message(good.kind, good.meta, {**good.arrays, "frames_encoded": garbage}), "bad_image"))
    bad = Message(good.kind, {**good.meta, "frame_shape": [3, 100000, 100000, 3]}, good.arrays)
    cases.append((bad, "too_large"))
    for msg, reason in cases:
        with pytest.raises(ProtocolError) as err:
            protocol.decode(_frames(msg))
        assert err.value.reason == reason


def _insert_with_triangulation(rows: int = 2):
    ins = _window()
    ins.kind = "insert"
    ins.meta["teacher"] = {}
    ins.arrays["matches"] = np.array([[0, 1, 1, 1, 2, 2, 1]] * rows, np.float32)
    ins.arrays["match_triangulation"] = np.array([[2.0, 2.5, 0.7]] * rows, np.float32)
    return ins


def test_match_triangulation_is_checked_against_the_matches():
    back = protocol.decode(_frames(_insert_with_triangulation()))
    np.testing.assert_array_equal(back.arrays["match_triangulation"], np.array([[2.0, 2.5, 0.7]] * 2, np.float32))
    ins = _insert_with_triangulation()
    ins.arrays["match_triangulation"] = ins.arrays["match_triangulation"][:1]  # one row short
    with pytest.raises(ProtocolError, match="bad_shape"):
        protocol.decode(_frames(ins))
    ins = _insert_with_triangulation()
    ins.arrays["match_triangulation"][1, 2] = np.inf
    with pytest.raises(ProtocolError, match="non_finite"):
        protocol.decode(_frames(ins))
    # a depth behind the camera, or a weight outside [0, 1] (the labeler's lies in it; 1e30 let one
    # match outweigh the window, as a score could)
    for column, value in ((0, -1.0), (2, -1e-6), (2, 1.001), (2, 1e30)):
        ins = _insert_with_triangulation()
        ins.arrays["match_triangulation"][1, column] = value
        with pytest.raises(ProtocolError) as err:
            protocol.decode(_frames(ins))
        assert err.value.reason == "bad_triangulation", (column, value)


def test_older_versions_are_still_accepted_and_unknown_versions_named():
    frames = _frames(_window())
    assert protocol.VERSION == 3 and frames[0] == b"R3W\x03"
    for older in (b"R3W\x01", b"R3W\x02"):  # the same layout without the arrays and meta added since
        assert protocol.decode([older, *frames[1:]]).kind == "window"
    sample = protocol.encode(protocol.Message("sample", {"batch_size": 2, "rank": 0}))  # a v2 sender's: no max_bytes
    assert protocol.decode([b"R3W\x02", *sample[1:]]).meta == {"batch_size": 2, "rank": 0}
    with pytest.raises(ProtocolError, match="bad_version"):
        protocol.decode([b"R3W\x04", *frames[1:]])


def test_matches_columns_by_name_in_window_batch_and_loss_rows():
    window = np.array([[0, 1, 1.0, 2.0, 3.0, 4.0, 0.9], [2, 0, 5.0, 6.0, 7.0, 8.0, 0.5]], np.float32)
    m = protocol.Matches(window)
    assert protocol.MATCH_COLUMNS == ("i", "j", "x_i", "y_i", "x_j", "y_j", "score")
    np.testing.assert_array_equal(m.view_i, [0, 2])
    np.testing.assert_array_equal(m.view_j, [1, 0])
    np.testing.assert_array_equal(m.xy_i, [[1, 2], [5, 6]])
    np.testing.assert_array_equal(m.xy_j, [[3, 4], [7, 8]])
    np.testing.assert_array_equal(m.score, np.array([0.9, 0.5], np.float32))
    np.testing.assert_array_equal(m.geometry, window[:, :6])
    with pytest.raises(ValueError, match="batch column"):
        m.window
    batch = np.concatenate((np.array([[3], [1]], np.float32), window), 1)  # as replay stacks them
    b = protocol.Matches(batch, batched=True)
    assert protocol.BATCH_MATCH_COLUMNS == ("b", *protocol.MATCH_COLUMNS) and batch.shape[1] == 8
    np.testing.assert_array_equal(b.window, [3, 1])
    for name in ("view_i", "view_j", "xy_i", "xy_j", "score"):
        np.testing.assert_array_equal(getattr(b, name), getattr(m, name))
    loss_rows = protocol.Matches(b.geometry, batched=True)  # what the match terms take: no score
    assert b.geometry.shape == (2, 7) and np.shares_memory(b.geometry, batch)
    np.testing.assert_array_equal(loss_rows.xy_j, m.xy_j)
    np.testing.assert_array_equal(loss_rows.window, b.window)


def test_match_scores_outside_zero_one_and_fractional_view_indices_are_refused():
    """A match's score is a weight of the match terms, in [0, 1] (the matchers give (0, 1]):
    1e30 let one match outweigh the window, a negative one turned its term around; a view index
    of 0.999 was read as view 0. Refused in an insert and a batch, the window's others kept."""
    good = [(0, 1, 3, 3, 4, 4, 1.0), (1, 2, 2, 2, 5, 5, 0.25)]
    for make in (_insert, lambda **kw: _batch(_insert(**kw))):
        protocol.decode(_frames(make(h=8, w=10, matches=good)))
        for column, value, reason in ((6, 1e30, "bad_score"), (6, -1e-6, "bad_score"), (6, 1.001, "bad_score"),
                                      (0, 0.999, "bad_index"), (1, 1.5, "bad_index")):
            row = [0, 1, 3, 3, 4, 4, 1.0]
            row[column] = value
            with pytest.raises(ProtocolError) as err:
                protocol.decode(_frames(make(h=8, w=10, matches=[*good, row])))
            assert err.value.reason == reason, (column, value)
    batch = _batch(_insert(h=8, w=10, matches=good))
    batch.arrays["matches"] = batch.arrays["matches"].copy()
    batch.arrays["matches"][0, 0] = 0.5  # the window index of a batch's row
    with pytest.raises(ProtocolError, match="bad_index"):
        protocol.decode(_frames(batch))
