import os
import tempfile
import warnings

os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="sclens-mpl-"))
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="sclens-numba-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def sim_small():
    from sclens.datasets import simulate_hematopoiesis

    return simulate_hematopoiesis(n_donors=3, cells_per_donor=120, seed=3, n_background_genes=300)


@pytest.fixture(scope="session")
def tiny_model(sim_small):
    """A random 2-layer scGPT over the simulated genes (eval mode)."""
    from sclens.models import GeneVocab, HookedScGPT, ScGPTConfig

    torch.manual_seed(0)
    vocab = GeneVocab.from_genes(list(sim_small.var_names))
    cfg = ScGPTConfig(embsize=32, nheads=4, d_hid=64, nlayers=2, dropout=0.0, max_seq_len=128)
    model = HookedScGPT(cfg, vocab).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture()
def rng():
    return np.random.default_rng(0)
