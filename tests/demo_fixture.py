"""A small embedded-default data directory, made once per test session (import the fixture)."""
import pytest

import tasks


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    tasks.main(tasks.TasksConfig(out_dir=str(out), n_pretrain=400, n_val=40, n_sft=64, n_rl=64, n_heldout=16,
                                 vocab_size=300))
    return out
