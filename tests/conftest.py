"""Shared fixtures: tiny MoE checkpoints built on the fly, sample calibration text."""

from __future__ import annotations

import os
import time

import pytest
import torch

from megatron_m2d.testing.tiny import FAMILY_CONFIGS, build_tiny_moe, write_sample_text

FAMILIES = list(FAMILY_CONFIGS)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    return write_sample_text(tmp_path_factory.mktemp("text"))


@pytest.fixture
def tiny(tmp_path):
    """tiny(model_type, name=..., **overrides) -> path of a fresh tiny MoE checkpoint."""
    def make(model_type="qwen3_moe", name=None, **kwargs):
        return build_tiny_moe(tmp_path / (name or model_type), model_type, **kwargs)
    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_runtest_setup(item):
    """.ci/run sets M2D_TEST_DEADLINE (epoch seconds) for the slow tests: one that would start after it is
    skipped, and says so, rather than the whole run being killed at CI's time limit with nothing reported."""
    deadline = os.environ.get("M2D_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("CI time budget spent before this test could start")
