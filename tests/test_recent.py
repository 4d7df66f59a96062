"""``reliev3r.recent.Recent``: a bounded mapping that keeps the most recently set or recalled keys."""

import copy

import pytest

from reliev3r.recent import Recent


def test_keeps_the_most_recent_keys_in_order():
    r = Recent(3)
    for k in "abcd":
        r[k] = k.upper()
    assert list(r) == ["b", "c", "d"]
    r["b"] = "B2"  # setting again makes it the most recent
    r["e"] = "E"
    assert list(r.items()) == [("d", "D"), ("b", "B2"), ("e", "E")]


def test_recall_refreshes_and_plain_reads_do_not():
    r = Recent(2)
    r["a"], r["b"] = 1, 2
    assert r.get("a") == 1 and "a" in r and r["a"] == 1
    r["c"] = 3  # "a" was read, not recalled: it goes
    assert list(r) == ["b", "c"]
    assert r.recall("b") == 2 and r.recall("zz", "none") == "none"
    r["d"] = 4  # "b" was recalled: "c" goes
    assert list(r) == ["b", "d"]


def test_keep_zero_keeps_nothing_and_negative_is_refused():
    r = Recent(0)
    r["a"] = 1
    assert len(r) == 0
    with pytest.raises(ValueError, match="keep must be >= 0"):
        Recent(-1)


def test_a_copy_keeps_the_bound():
    r = Recent(2)
    r["a"], r["b"] = 1, 2
    c = copy.deepcopy(r)
    c["c"] = 3
    assert c.keep == 2 and list(c) == ["b", "c"] and list(r) == ["a", "b"]
