"""Command line: ``python -m ksfx inspect module:factory [--rewrite auto|always|never]``.

``factory()`` returns ``(model, example_inputs)`` (a tensor or a tuple of them); the
command prints :func:`ksfx.explain`'s report: chains, decisions, graph breaks and the
rewritten graphs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch


def _load(spec: str):
    if ":" not in spec:
        raise SystemExit(f"expected module:factory, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise SystemExit(f"{module_name} has no attribute {attr!r}")
    model, inputs = factory()
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return model, tuple(inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ksfx", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print what the ksfx backend finds and rewrites")
    inspect.add_argument("target", help="module:factory, factory() -> (model, example_inputs)")
    inspect.add_argument("--rewrite", default="auto", choices=("auto", "always", "never"))
    args = parser.parse_args(argv)
    from ksfx.backend import explain

    model, inputs = _load(args.target)
    print(explain(model, *inputs, rewrite=args.rewrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
