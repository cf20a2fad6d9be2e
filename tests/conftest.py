"""Shared fixtures (helpers live in helpers.py): a tiny random Llama, a character tokenizer, random blocks, a
saved tiny model folder; and the `integration` marker for every test that needs the embedded SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network (before any HF import)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

from hf_mrp.data import Blocks

from helpers import VOCAB, CharTokenizer, tiny_llama

EMBEDDED_FIXTURES = {"tiny_model_dir"}  # fixtures that load the embedded model's tokenizer


class XdistGroupIds:
    """`make test`'s --dist loadgroup sends the tests of one xdist_group to one worker by the '@group' suffix of their
    node ids; pytest-xdist 3.8 writes that suffix to ``item._nodeid``, which pytest 9.2 no longer reads (its node
    ids live in ``item._id``), so without this every group would be spread over the workers. In xdist's workers only,
    after xdist's own hook."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not getattr(config.option, "loadgroup", False):
            return
        from _pytest.nodeid import NodeId

        for item in items:
            groups = sorted({str(mark.args[0]) for mark in item.iter_markers("xdist_group") if mark.args})
            if groups and "@" not in item.nodeid and hasattr(item, "_id"):
                item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(XdistGroupIds(), "xdist-group-ids")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses an embedded-model fixture is an `integration` test (not in the fast tier); every test of the
    session's Ray (ray_cluster) runs on one xdist worker (`make test`: --dist loadgroup), as another worker would
    start a second Ray of 2 CPUs on the same cores."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if EMBEDDED_FIXTURES & fixtures:
            item.add_marker(pytest.mark.integration)
        if "ray_cluster" in fixtures:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def blocks() -> Blocks:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(5, 24), dtype=np.int64)
    return Blocks(ids, n_positions=5 * 23 - 7, source="random")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama folder saved with the embedded SmolLM2 tokenizer (CLI and pipeline tests)."""
    from transformers import AutoTokenizer

    from hf_mrp import models

    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(models.embedded_model_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ddp_nan_batch(tmp_path_factory):
    """helpers.NAN_BATCH_SCRIPT under DDP (2 gloo CPU processes), launched once for the tests that read it (the
    skip agreement of test_reliability, the DDP reference of test_deepspeed's ZeRO-3 case): (its folder, the run)."""
    from helpers import FAKE_TOKEN, launched, nan_batch_script

    out = tmp_path_factory.mktemp("ddp_nan")
    script = out / "ddp_nan.py"
    script.write_text(nan_batch_script(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_TOKEN": FAKE_TOKEN}
    return out, launched([str(script)], processes=2, env=env, timeout=300)


@pytest.fixture
def loopback_hub(monkeypatch):
    """A loopback Hub (tests/hub_server.py) that this process's huggingface_hub pushes to: its endpoint, online,
    the legacy upload path (no Xet), and FAKE_TOKEN as the login. Stopped when the test ends."""
    import huggingface_hub.constants

    from helpers import FAKE_TOKEN
    from hub_server import LoopbackHub

    with LoopbackHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        yield hub


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray of 2 CPUs for every sweep of the session (`hf-mrp sweep` runs on a Ray already started in its
    process as it is): its address, for a sweep launched as another process. Quiet as the sweep's own local Ray."""
    import logging

    import ray

    from hf_mrp.research.sweep.engine import QUIET

    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
