"""sclens.evaluation: endpoints, endpoint files, donor and source splits, per-donor scoring."""

import numpy as np
import pandas as pd
import pytest

from sclens.errors import InputError
from sclens.evaluation import Endpoint, donor_splits, parse_binary_spec, read_bench_config, score_endpoint


def test_score_endpoint_averages_over_test_donors():
    ep = Endpoint("b", "binary", "lab", positive=["P"], negative=["N"])
    target = np.array([0, 1, 0, 1, 0, 1, np.nan])
    score = np.array([0.2, 0.9, 0.6, 0.4, 0.1, 0.7, 0.5])
    groups = np.array(["d1", "d1", "d2", "d2", "d3", "d3", "d3"])
    res = score_endpoint(ep, target, {"score": score}, groups)
    assert res["auroc"] == pytest.approx((1 + 0 + 1) / 3)
    assert res["balanced_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    dep = Endpoint("d", "depth", "t")
    res = score_endpoint(dep, np.array([0, 1, 2, 0, 1, 2.0]), {"pseudotime": np.array([0, 1, 2, 2, 1, 0.0])},
                         np.array(["a"] * 3 + ["b"] * 3))
    assert res["abs_spearman"] == pytest.approx(1.0)  # |rho| per donor: orientation is not scored


# ------------------------------------------------------------------ splits
def test_donor_splits_are_disjoint_seeded_and_fail_clearly():
    donors = np.repeat([f"d{i}" for i in range(10)], 5)
    a = donor_splits(donors, n_splits=12, seed=3)
    b = donor_splits(donors, n_splits=12, seed=3)
    assert len(a) == 12 and all(np.array_equal(x.test, y.test) for x, y in zip(a, b))
    for s in a:
        assert not set(donors[s.train]) & set(donors[s.test])
        assert len(set(donors[s.test])) == 2  # 20 % of 10 donors
    loo = donor_splits(donors, scheme="loo")
    assert len(loo) == 10 and all(len(set(donors[s.test])) == 1 for s in loo)
    kf = donor_splits(donors, scheme="kfold", n_splits=5, seed=0)
    assert sorted(np.concatenate([s.test for s in kf]).tolist()) == list(range(50))
    with pytest.raises(InputError, match="needs at least 3 donors"):
        donor_splits(["a", "a", "b"], n_splits=2)
    with pytest.raises(InputError, match="needs at least 12 donors"):
        donor_splits(donors, scheme="kfold", n_splits=12)
    cells = donor_splits(["s"] * 40, scheme="cells", n_splits=3, strata=["x", "y"] * 20, seed=0)
    assert all(len(s.test) == 8 for s in cells)


def test_source_splits_train_elsewhere_and_partition_the_test_source():
    src = np.array(["atlas"] * 60 + ["sorted"] * 30)
    lab = np.array(["x", "y", "z"] * 30)
    sp = donor_splits(src, scheme="source", test_sources=["sorted"], n_splits=3, strata=lab, seed=1)
    assert len(sp) == 3
    assert sorted(np.concatenate([s.test for s in sp]).tolist()) == list(range(60, 90))  # disjoint folds cover it
    for s in sp:
        assert set(src[s.train]) == {"atlas"} and set(src[s.test]) == {"sorted"}
        assert len(s.train) == 48 and sorted(np.unique(lab[s.train], return_counts=True)[1]) == [16, 16, 16]
        assert s.test_groups == ["sorted"]
    assert len({tuple(s.train) for s in sp}) == 3  # the training subsample changes with the split
    again = donor_splits(src, scheme="source", test_sources=["sorted"], n_splits=3, strata=lab, seed=1)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test) for a, b in zip(sp, again))
    with pytest.raises(InputError, match="missing \\['mudan'\\]"):
        donor_splits(src, scheme="source", test_sources=["mudan"], n_splits=3)
    with pytest.raises(InputError, match="nothing is left to train on"):
        donor_splits(src, scheme="source", test_sources=["atlas", "sorted"], n_splits=3)


# ------------------------------------------------------------------ endpoints
def test_endpoint_parsing_and_errors(tmp_path):
    ep = parse_binary_spec("CD4 T | Treg vs CD8 T", "cell_type")
    assert ep.negative == ["CD4 T", "Treg"] and ep.positive == ["CD8 T"]
    with pytest.raises(InputError, match="expected 'A vs B'"):
        parse_binary_spec("CD4 T, CD8 T", "cell_type")
    with pytest.raises(InputError, match="on both sides"):
        Endpoint("x", "binary", "c", positive=["a"], negative=["a"])
    obs = pd.DataFrame({"c": ["a", "b", "a"]})
    with pytest.raises(InputError, match=r"labels not found in 'c': \['z'\]"):
        Endpoint("x", "binary", "c", positive=["z"], negative=["a"]).check(obs)
    with pytest.raises(InputError, match="obs column 'nope' not found"):
        Endpoint("x", "multiclass", "nope").targets(obs)
    grouped = Endpoint("g", "multiclass", "c", label_map={"a": "A", "b": "B"})
    assert list(Endpoint("g", "multiclass", "c", label_map={"a": "A"}).targets(pd.DataFrame({"c": ["a", "q"]}))) \
        == ["A", None] and list(grouped.targets(obs)) == ["A", "B", "A"]
    with pytest.raises(InputError, match="label_map leaves fewer than 2 classes"):
        Endpoint("g", "multiclass", "c", label_map={"a": "A", "zz": "Z"}).check(obs)
    bad = tmp_path / "bad.toml"
    bad.write_text('label_key = "c"\nfoo = 1\n[[endpoint]]\nname = "m"\nkind = "multiclass"\n')
    with pytest.raises(InputError, match=r"unknown settings \['foo'\]"):
        read_bench_config(bad)
    bad.write_text('label_key = "c"\n')
    with pytest.raises(InputError, match="at least one"):
        read_bench_config(bad)


