"""Shared fixtures.

``demo_root``: a tiny kronify demo dataset in fastMRI single-coil format, built once per test session
(:data:`DEMO_TEST_KW`: 6 volumes of 6 slices, k-space 64x40, crop 32x32; one volume is CORPDFS_FBK).
``make_demo(path, **kw)``: build another one into ``path`` with any of
:func:`kronify.mri.data.demo.build_demo_dataset`'s keyword arguments overriding :data:`DEMO_TEST_KW`.
``demo_kw``: the parameters of ``demo_root``. Both builders give the dataset root (holding
``singlecoil_train/`` and ``singlecoil_val/``).
``offline_hub``: no pretrained weights reachable and any download attempt fails the test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

DEMO_TEST_KW = dict(cases=6, seed=0, crop=32, matrix=(64, 40), slices=6)


@pytest.fixture(scope="session")
def demo_kw() -> dict:
    """The build parameters of ``demo_root`` (a copy of DEMO_TEST_KW)."""
    return dict(DEMO_TEST_KW)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny demo dataset shared by the whole session (treat it as read-only)."""
    from kronify.mri.data.demo import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo"), **DEMO_TEST_KW).root


@pytest.fixture(scope="session")
def make_demo() -> Callable[..., Path]:
    """Factory ``make_demo(path, **kw) -> root``: a demo dataset with DEMO_TEST_KW overridden by ``kw``."""
    from kronify.mri.data.demo import build_demo_dataset

    def make(path: Path, **kw) -> Path:
        return build_demo_dataset(path, **{**DEMO_TEST_KW, **kw}).root

    return make


def _no_download(*args, **kwargs):
    raise AssertionError(f"a download was attempted: {args!r}")


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch hub dir, no weight-path env overrides, every download entry point made to fail loudly.

    Returns the hub's (not yet existing) ``checkpoints`` folder, where pretrained weights would be looked up.
    """
    import urllib.request

    import torch
    import torchvision.models._api as tv_api

    from kronify.mri import backbones as W

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(W.ALEXNET.env_var, raising=False)
    monkeypatch.delenv(W.VGG19.env_var, raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(urllib.request, "urlopen", _no_download)
    return hub / "checkpoints"
