"""nn.Embedding conversion (opt-in, or under a budget) and output heads tied to an embedding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kronify
from kronify.parametrization import is_kron


class TinyLM(nn.Module):
    """Embedding -> Linear -> head tied to the embedding (as GPT-2 / BERT tie their output layer)."""

    def __init__(self, vocab: int = 32, dim: int = 16, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _ids() -> torch.Tensor:
    return torch.randint(0, 32, (3, 7), generator=torch.Generator().manual_seed(1))


def test_embeddings_are_left_alone_by_default() -> None:
    model = TinyLM()
    report = kronify.convert(model, n=2, warm_start=True)
    assert report.converted == ["mix"]
    assert not is_kron(model.embed) and model.head.weight is model.embed.weight


def test_embedding_and_its_tied_head_share_one_set_of_factors() -> None:
    torch.manual_seed(0)
    dense = TinyLM()
    report = kronify.convert(dense, n=2, terms=4, warm_start=True, embeddings=True, inplace=False)
    model = report.model
    assert set(report.converted) == {"embed", "mix"}
    assert "tied to embed" in report.skipped["head"]
    assert model.head.parametrizations.weight is model.embed.parametrizations.weight
    torch.testing.assert_close(model(_ids()), dense(_ids()), atol=1e-5, rtol=1e-5)  # terms = n²: exact
    params = {id(p) for p in model.parameters()}
    assert len(params) == len(list(model.parameters()))
    # a step on the shared factors moves both the embedding and the head
    before = model.head.weight.detach().clone()
    model(_ids()).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert torch.equal(model.head.weight, model.embed.weight) and not torch.equal(model.head.weight, before)


def test_tied_factors_survive_save_load_and_merge(tmp_path) -> None:
    torch.manual_seed(0)
    dense = TinyLM()
    report = kronify.convert(dense, n=2, warm_start=True, embeddings=True, inplace=False)
    path = tmp_path / "lm.safetensors"
    kronify.save(report.model, path, config=report.config)
    loaded = kronify.load(TinyLM(), path)
    assert loaded.head.parametrizations.weight is loaded.embed.parametrizations.weight
    assert torch.equal(loaded(_ids()), report.model(_ids()))
    merged = kronify.merge(loaded, inplace=False)
    assert merged.head.weight is merged.embed.weight
    assert torch.equal(merged(_ids()), report.model(_ids()))


def test_untied_embedding_and_the_reasons_an_embedding_stays_dense() -> None:
    model = TinyLM(tie=False)
    report = kronify.convert(model, n=2, warm_start=True, embeddings=True, inplace=False)
    assert {"embed", "mix", "head"} <= set(report.converted)
    odd = TinyLM(vocab=31, tie=False)
    assert "num_embeddings=31 not divisible" in kronify.convert(odd, n=2, embeddings=True).skipped["embed"]
    capped = TinyLM(tie=False)
    capped.embed.max_norm = 1.0
    assert "max_norm" in kronify.convert(capped, n=2, embeddings=True).skipped["embed"]


def test_a_budget_considers_embeddings() -> None:
    torch.manual_seed(0)
    model = TinyLM(vocab=512, dim=128, tie=False)
    report = kronify.convert(model, budget=0.3, warm_start=True, inplace=False)
    assert "embed" in report.converted and report.config.embeddings is True
    assert abs(report.ratio - 0.3) <= 0.01 * 0.3
    again = kronify.convert(copy.deepcopy(model), report.config)
    assert again.params_after == report.params_after


@pytest.mark.parametrize("flag", [False, None])
def test_a_budget_without_embeddings_when_they_are_switched_off(flag) -> None:
    model = TinyLM(vocab=256, dim=64, tie=False)
    report = kronify.convert(model, budget=0.5, embeddings=flag, inplace=False)
    assert ("embed" in report.converted) == (flag is None)
