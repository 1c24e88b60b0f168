"""Shared fixtures: tiny generated datasets in a per-session data folder (never the user cache)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """Every test (and every script a test starts) reads and writes datasets here."""
    d = tmp_path_factory.mktemp("seqrl_data")
    old = os.environ.get("SEQRL_DATA_DIR")
    os.environ["SEQRL_DATA_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SEQRL_DATA_DIR", None)
    else:
        os.environ["SEQRL_DATA_DIR"] = old


TINY_BUDGET = 20_000  # ARS env steps: a few seconds, enough for hopper to start hopping


@pytest.fixture(scope="session")
def tiny_dataset(data_dir):
    """tiny_dataset(env="hopper", dataset="medium", size=3000) -> path of a small generated .npz
    (ARS budget 20k steps; cached for the whole session). Pass it to scripts as --dataset-path."""
    import common
    made = {}

    def make(env="hopper", dataset="medium", size=3000):
        key = (env, dataset, size)
        if key not in made:
            data = common.load_dataset(env, dataset, size=size, seed=0, budget=TINY_BUDGET,
                                       verbose=False)
            path = Path(data_dir) / f"tiny-{env}-{dataset}-{size}.npz"
            common.save_npz(path, data)
            made[key] = path
        return made[key]

    return make
