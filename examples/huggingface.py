"""A Hugging Face model with kronify: convert GPT-2 (built from a small config, random weights, nothing
downloaded), train a few steps, save with safetensors, load onto a fresh model, merge and save_pretrained.

    python examples/huggingface.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kronify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    out = parser.parse_args().out or Path(tempfile.mkdtemp(prefix="kronify-hf-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    model = GPT2LMHeadModel(config)

    cfg = kronify.KronConfig(n=2)  # cold start: each weight keeps its own init scale (std 0.02 here)
    report = kronify.convert(model, cfg)
    print(report, end="\n\n")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config.vocab_size, (4, 16))
    for step in range(5):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")

    path = out / "gpt2-kron.safetensors"
    kronify.save(model, path, config=cfg)
    loaded = kronify.load(GPT2LMHeadModel(config), path).eval()
    model.eval()
    with torch.no_grad():
        same = torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)
    print(f"\nsaved {path} ({path.stat().st_size:,} bytes); loaded model reproduces the logits exactly: {same}")

    kronify.merge(loaded).save_pretrained(out / "merged")
    print(f"merged into plain transformers layers and saved with save_pretrained: {out / 'merged'}")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
