import numpy as np
import pytest

from sclens.errors import InputError
from sclens.ontology import StageDAG


@pytest.fixture(scope="module")
def dag():
    return StageDAG.default()


def test_default_dag_shape(dag):
    assert 30 <= len(dag.stages) <= 36
    assert len(dag.branches) == 7
    assert dag.depth("HSC") == 0 and dag.depth("MPP") == 1 and dag.depth("GMP") == 3
    assert dag.depth("Neutrophil") == 5 and dag.depth("Memory CD8 T") == 6


def test_ruler_is_a_symmetric_hop_metric(dag):
    R = dag.ruler_matrix
    assert np.allclose(R, R.T) and np.all(np.diag(R) == 0) and np.isfinite(R).all()
    assert dag.ruler("Naive CD4 T", "Memory CD4 T") == 1
    assert dag.ruler("Erythrocyte", "Neutrophil") == dag.ruler("Erythrocyte", "CMP") + dag.ruler("CMP", "Neutrophil")


def test_null_ruler_shuffles_within_branches_only(dag):
    N, perm = dag.null_ruler_matrix(seed=3)
    assert all(dag.branch[k] == dag.branch[v] for k, v in perm.items())
    assert sorted(N.ravel()) == sorted(dag.ruler_matrix.ravel()) or N.shape == dag.ruler_matrix.shape
    assert not np.array_equal(N, dag.ruler_matrix)


@pytest.mark.parametrize("label,stage", [
    ("CD14+ Monocyte", "Classical monocyte"), ("FCGR3A+ Monocytes", "Non-classical monocyte"),
    ("CD4 T cells", "Naive CD4 T"), ("CD8+/CD45RA+ Naive Cytotoxic", "Naive CD8 T"), ("nk", "CD56dim NK"),
    ("Multipotent progenitors", "MPP"), ("PreDC", "Pre-DC"), ("Erythrocyte", "Erythrocyte"),
    ("regulatoryt", "Regulatory T"), ("Tem/Trm cytotoxic T cells", "Memory CD8 T"), ("CD34+", "HSC"),
    ("plasmacytoid dendritic cell", "pDC"), ("B cells", "Naive B"), ("megakaryocytes", "Megakaryocyte"),
])
def test_synonyms(dag, label, stage):
    assert dag.lookup(label) == stage


def test_unmapped_labels_are_reported(dag):
    m = dag.map_labels(["CD14+ Monocyte", "doublet", "doublet", "unknown", "B cells"])
    assert m.unmapped == {"doublet": 2, "unknown": 1}
    assert "3 of 5 cells" in m.summary()


def test_user_dag_errors(tmp_path):
    with pytest.raises(InputError, match="cycle"):
        StageDAG({"root": "A", "stages": {"A": {"parents": ["C"]}, "B": {"parents": ["A"]}, "C": {"parents": ["B"]}}})
    with pytest.raises(InputError, match="unknown parent"):
        StageDAG({"root": "A", "stages": {"A": {}, "B": {"parents": ["Z"]}}})
    with pytest.raises(InputError, match="claimed by both"):
        StageDAG({"root": "A", "stages": {"A": {"synonyms": ["x"]}, "B": {"parents": ["A"], "synonyms": ["X"]}}})
    p = tmp_path / "dag.yaml"
    p.write_text("root: A\nstages:\n  A: {}\n  B: {parents: [A]}\n")
    assert StageDAG.from_yaml(p).depth("B") == 1


def test_annotate_writes_obs(dag, sim_small):
    a = sim_small.copy()
    m = dag.annotate(a, "cell_type")
    assert m.unmapped == {}
    assert (a.obs["sclens_depth"].values == a.obs["depth"].values).all()
