"""Shared fixtures: a tiny model folder built from a config, and a private environment for DeepSpeed.

Every test is marked by the folder it lives in (tests/integration -> integration, tests/distributed ->
distributed, tests/e2e -> e2e, tests/gpu -> gpu and integration: its tests are training loops on CUDA),
so ``pytest -m "not integration and not distributed and not e2e"`` is the unit tier (tests/unit) on any
machine, and ``pytest tests/unit`` the same tests.
"""

import os
from pathlib import Path

import pytest

# One thread per process: on 2 cores, tiny models run 10-40x faster this way (DESIGN.md section 5).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

TESTS = Path(__file__).resolve().parent
# tests/<folder>/... -> the markers every test in that folder gets (registered in pyproject.toml).
FOLDER_MARKERS = {"integration": ("integration",), "distributed": ("distributed",), "e2e": ("e2e",),
                  "gpu": ("gpu", "integration")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            folder = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        except ValueError:  # a test outside tests/
            continue
        for marker in FOLDER_MARKERS.get(folder, ()):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM + ChatML BPE tokenizer saved as a Hugging Face folder."""
    from distrib_ft.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def biased_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with biases in every attention and MLP projection (nonzero: BitFit's, BEFT's merge)."""
    import torch
    from safetensors.torch import load_file, save_file

    from distrib_ft.tiny import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("tiny-biased"), attention_bias=True, mlp_bias=True)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name, value in weights.items():
        if name.endswith(".bias"):  # nonzero biases, so that a test sees the right ones train
            weights[name] = torch.randn(value.shape, generator=gen) * 0.1
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API for the session: moto's server on 127.0.0.1 at a free port (tests/s3.py); yields its URL."""
    from tests.s3 import moto_s3

    with moto_s3() as endpoint:
        yield endpoint
