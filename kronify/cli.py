"""Command line: `kronify report MODEL --n 2 [--terms T] [--warm-start] [--json] [--input-size ...]`.

MODEL is `timm:NAME`, `torchvision:NAME` or `package.module:factory` (a callable returning an
nn.Module, called without arguments). Models are always built without pretrained weights, so
nothing is downloaded. Exit status: 0 on success, 2 for a bad model spec or bad options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Sequence

import torch
from torch import nn

from kronify.analysis import count_flops
from kronify.convert import convert


class UsageError(Exception):
    """A bad command line (unknown model, bad option values): exit status 2."""


def build_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Build the model named by `spec` (pretrained=False) and return it with its known input size (C, H, W...)."""
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise UsageError(f"MODEL must be timm:NAME, torchvision:NAME or package.module:factory, got {spec!r}")
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise UsageError("timm is not installed (pip install 'kronify[models]')") from None
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise UsageError(f"unknown timm model {name!r}: {e}") from None
        size = getattr(model, "pretrained_cfg", {}).get("input_size")
        return model, tuple(size) if size else None
    if source == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise UsageError("torchvision is not installed (pip install 'kronify[models]')") from None
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as e:
            raise UsageError(f"unknown torchvision model {name!r}: {e}") from None
        classifiers = set(torchvision.models.list_models(module=torchvision.models))
        return model, (3, 224, 224) if name.lower() in classifiers else None
    try:
        module = _import_from_cwd(source)
    except ImportError as e:
        raise UsageError(f"cannot import {source!r} for model {spec!r}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{source!r} has no callable {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model, None


def _import_from_cwd(name: str):
    """Import `name` with the current directory searched first, as `python -m` does (the console
    script's own sys.path lacks it), so `kronify report mypkg.models:make` works from a project folder."""
    cwd = os.getcwd()
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kronify", description="Kronecker (PHM) conversion of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="convert a model (no pretrained weights) and print the conversion report")
    rep.add_argument("model", metavar="MODEL", help="timm:NAME, torchvision:NAME or package.module:factory")
    rep.add_argument("--n", type=int, default=2, help="Kronecker factor size (default 2)")
    rep.add_argument("--terms", type=int, default=None, help="Kronecker terms per layer (default n)")
    rep.add_argument("--algebra", default="learned", help="learned (default), complex (n=2) or quaternion (n=4)")
    rep.add_argument("--warm-start", action="store_true", help="fit the factors to the current weights (SVD)")
    rep.add_argument("--include", action="append", default=None, metavar="PATTERN", help="repeatable")
    rep.add_argument("--exclude", action="append", default=None, metavar="PATTERN", help="repeatable")
    rep.add_argument("--strict", action="store_true", help="fail if a selected layer cannot be converted")
    rep.add_argument("--input-size", type=int, nargs="+", default=None, metavar="D",
                     help="input size without batch (e.g. 3 224 224) to count FLOPs; defaults to the model's "
                          "known size")
    rep.add_argument("--no-flops", action="store_true", help="do not count FLOPs")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kronify` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        model, known_size = build_model(args.model)
        model.eval()
        report = convert(model, args.n, terms=args.terms, algebra=args.algebra, warm_start=args.warm_start,
                         include=args.include, exclude=args.exclude, strict=args.strict)
    except (UsageError, ValueError, TypeError) as e:
        print(f"kronify: error: {e}", file=sys.stderr)
        return 2
    size = tuple(args.input_size) if args.input_size else known_size
    flops = None
    if size and not args.no_flops:
        try:
            flops = count_flops(report.model, torch.zeros(1, *size))
        except Exception as e:  # a wrong --input-size: still print the report
            print(f"kronify: FLOPs not counted for input 1x{'x'.join(map(str, size))}: {e}", file=sys.stderr)
    if args.json:
        out = report.to_dict()
        out["model"] = args.model
        if flops is not None:
            out["flops"] = flops
            out["flops_input_size"] = [1, *size]
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model}  (n={args.n}, terms={args.terms or args.n}, warm_start={args.warm_start})")
        print(report)
        if flops is not None:
            print(f"FLOPs (input 1x{'x'.join(map(str, size))}, 2 per multiply-add): forward {flops['forward']:,} "
                  f"(as the dense model's; +{flops['weight_rebuild']:,} to rebuild the dense weights "
                  f"once per weight update)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
