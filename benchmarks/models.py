"""End-to-end latency of KS models: eager vs Inductor vs ``torch.compile(backend="ksfx")``.

Models (``examples/ks_models.py``, plain PyTorch, random weights): KS-ViT-S/16 (Q, K, V
and MLP projections as 2-factor KS chains, the paper's patterns) and GPT-2 medium with
KS MLPs. ``--quick`` shrinks both (two blocks) so that the run fits a CPU. Each compiled
model's output (and, with ``--train``, its gradients) is checked against eager before
it is timed. A missing or failing ksfx backend is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import ksfx
from benchmarks import common
from benchmarks.common import report_failure
from examples import ks_models

#: ``ksfx`` is ``backend="ksfx"`` (``rewrite="auto"``: the cost model decides per chain);
#: ``ksfx_always`` rewrites every structured chain, to measure what the cost model avoids.
#: How a chain is launched on CUDA: ``ksfx`` by Inductor (the ``triton_op``), ``ksfx_op``
#: from Python (the ``custom_op``), ``ksfx_epilogue`` by Inductor with the pointwise op after
#: it fused into its store; ``*_cudagraphs`` is ``mode="reduce-overhead"`` (CUDA graphs).
CONTENDERS = (
    "eager",
    "inductor",
    "ksfx",
    "ksfx_always",
    "ksfx_op",
    "ksfx_epilogue",
    "inductor_cudagraphs",
    "ksfx_cudagraphs",
)
#: The contenders that differ from ``ksfx`` on CUDA tensors only.
CUDA_ONLY = ("ksfx_op", "ksfx_epilogue", "inductor_cudagraphs", "ksfx_cudagraphs")
#: Relative error (max |y - ref| / max |ref|) allowed between a compiled model and eager.
MODEL_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}

#: name -> (full config, full batch, quick config, quick batch)
MODELS = {
    "vit": (ks_models.VIT_S16, 128, ks_models.VIT_SMALL, 32),
    "gpt2": (ks_models.GPT2_MEDIUM, 8, ks_models.GPT2_SMALL, 4),
}


def build(name: str, quick: bool, batch: int | None, device: torch.device, dtype: torch.dtype):
    full_cfg, full_batch, quick_cfg, quick_batch = MODELS[name]
    cfg = quick_cfg if quick else full_cfg
    batch = batch or (quick_batch if quick else full_batch)
    torch.manual_seed(0)
    if name == "vit":
        model = ks_models.KSViT(cfg)
        inputs = ks_models.vit_inputs(cfg, batch, device=device, dtype=dtype)
    else:
        model = ks_models.KSGPT2(cfg)
        inputs = ks_models.gpt2_inputs(cfg, batch, device=device)
    return model.to(device=device, dtype=dtype), inputs, cfg, batch


def case_key(name: str, quick: bool, dtype_name: str, mode: str, batch: int) -> str:
    return f"{name}|{'quick' if quick else 'full'}|{dtype_name}|{mode}|{batch}"


def compiler(contender: str, model: torch.nn.Module):
    if contender == "eager":
        return model
    if contender == "inductor":
        return torch.compile(model)
    if contender == "inductor_cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    if contender == "ksfx_cudagraphs":
        return torch.compile(model, backend="ksfx", mode="reduce-overhead")
    options = {
        "ksfx_always": {"rewrite": "always"},
        "ksfx_op": {"cuda": "op"},
        "ksfx_epilogue": {"epilogue_fusion": True},
    }
    return torch.compile(model, backend=ksfx.backend(**options.get(contender, {})))


def explain_summary(model, inputs, rewrite: str) -> dict:
    """What ``ksfx.explain`` finds: chains, their patterns, rewritten or not and why."""
    report = ksfx.explain(model, *inputs, rewrite=rewrite)
    chains = [
        {"patterns": [list(p) for p in chain.patterns], "rewritten": bool(chain.rewritten), "reason": str(chain.reason)}
        for chain in report.chains
    ]
    return {"chains": len(chains), "rewritten": sum(c["rewritten"] for c in chains), "details": chains}


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Largest per-parameter ``max |g - ref|`` relative to that parameter's scale.

    A parameter's scale is floored at 1e-3 of the largest gradient of the model: some
    gradients are zero in exact arithmetic (a key bias under softmax) and hold only
    rounding noise, which must not count as a mismatch.
    """
    if grads.keys() != ref.keys():
        return float("inf")
    floor = 1e-3 * max(r.abs().max().item() for r in ref.values())
    return max(
        (grads[n].float() - ref[n].float()).abs().max().item() / max(ref[n].abs().max().item(), floor) for n in ref
    )


def run_case(name: str, dtype_name: str, mode: str, device: torch.device, args) -> dict:
    dtype = common.DTYPES[dtype_name]
    model, inputs, cfg, batch = build(name, args.quick, args.batch, device, dtype)
    train = mode == "train"
    model.train(train)
    case = {
        "key": case_key(name, args.quick, dtype_name, mode, batch),
        "model": name,
        "size": "quick" if args.quick else "full",
        "config": {k: v for k, v in asdict(cfg).items()},
        "batch": batch,
        "dtype": dtype_name,
        "mode": mode,
        "times": {},
        "compile_s": {},
        "errors": {},
        "correct": {},
        "unavailable": {},
        "ksfx_op_launches": {},
    }
    initial = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None

    def step(fn):
        if not train:
            with torch.no_grad():
                return fn(*inputs)
        out = fn(*inputs)
        loss_of(out).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    def check(fn) -> float:
        """Relative error of one forward (and its gradients when training) against eager."""
        model.load_state_dict(initial)
        if not train:
            with torch.no_grad():
                return common.rel_error(fn(*inputs), ref_out)
        out = fn(*inputs)
        loss_of(out).backward()
        err = max(common.rel_error(out, ref_out), grad_error(grads_of(model), ref_grads))
        model.zero_grad(set_to_none=True)
        return err

    if train:
        ref_out = model(*inputs)
        loss_of(ref_out).backward()
        ref_grads = grads_of(model)
        model.zero_grad(set_to_none=True)
        ref_out = ref_out.detach()
    else:
        with torch.no_grad():
            ref_out = model(*inputs)

    ready = {}
    for contender in args.contenders:
        try:
            fn = compiler(contender, model)  # may refuse an option this torch lacks
            model.load_state_dict(initial)
            start = time.perf_counter()
            step(fn)  # compiles
            common.synchronize(device)
            case["compile_s"][contender] = time.perf_counter() - start
            ksfx.stats(reset=True)
            err = check(fn)
            case["ksfx_op_launches"][contender] = ksfx.stats(reset=True)  # KS op calls in one checked step
            case["errors"][contender] = err
            case["correct"][contender] = err <= MODEL_TOLERANCE[dtype_name]
            ready[contender] = fn
        except Exception as exc:  # a failing contender is recorded, the others still run
            case["unavailable"][contender] = common.contender_failure(exc, args.verbose, limit=1000)
    model.load_state_dict(initial)
    case["times"] = common.measure_interleaved(
        {name: (lambda fn=fn: step(fn)) for name, fn in ready.items()},
        device,
        args.rounds,
        rep_ms=args.rep_ms,
        cpu_min_time=args.cpu_min_time,
    )
    model.load_state_dict(initial)
    model.eval()
    case["explain"] = {}
    for contender, rewrite in (("ksfx", "auto"), ("ksfx_always", "always")):
        if contender in args.contenders:
            try:
                case["explain"][contender] = explain_summary(model, inputs, rewrite)
            except Exception as exc:  # recorded: the timings above stand without it
                case["explain"][contender] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                report_failure(args.verbose)
    times = case["times"]
    ratios = {}
    pairs = (
        ("ksfx", "inductor"),
        ("ksfx_always", "inductor"),
        ("ksfx", "eager"),
        ("inductor", "eager"),
        ("ksfx", "ksfx_op"),
        ("ksfx_epilogue", "ksfx"),
        ("ksfx_cudagraphs", "inductor_cudagraphs"),
    )
    for num, den in pairs:
        if num in times and den in times:
            ratios[f"{num}/{den}"] = times[num] / times[den]
    case["ratios"] = ratios
    return case


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two-block models for a CPU (a few minutes on 2 cores)")
    p.add_argument("--model", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    p.add_argument("--batch", type=int, default=None, help="batch size (default: vit 128 / gpt2 8; quick 32 / 4)")
    p.add_argument("--dtype", default="fp32", help="comma list of fp32,fp16,bf16")
    p.add_argument("--train", action="store_true", help="time a training step (forward, backward, SGD) too")
    p.add_argument(
        "--contenders",
        default=None,
        help="comma list of "
        + ",".join(CONTENDERS)
        + " (default on CPU: those not in "
        + ",".join(CUDA_ONLY)
        + "; on GPU eager,inductor,ksfx: rewrite='auto' already rewrites every structured chain there)",
    )
    p.add_argument("--force", action="store_true", help="measure again cases already in the output file")
    common.add_run_options(p, "models", rep_ms=2000.0, cpu_min_time=1.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = common.apply_run_options(args)
    on_cpu = tuple(c for c in CONTENDERS if c not in CUDA_ONLY)
    default_contenders = on_cpu if device.type == "cpu" else ("eager", "inductor", "ksfx")
    args.contenders = common.parse_list(args.contenders or ",".join(default_contenders), CONTENDERS, "--contenders")
    models = common.parse_list(args.model, MODELS, "--model")
    dtypes = common.parse_list(args.dtype, common.DTYPES, "--dtype")
    modes = ["inference", "train"] if args.train else ["inference"]
    results = common.ResultFile.for_run("models", args, device, argv)
    budget = common.Budget(args.time_budget)
    todo = [(m, dt, mode) for m in models for dt in dtypes for mode in modes]
    progress = common.Progress(len(todo), "models")
    for name, dtype_name, mode in todo:
        if budget.exhausted():
            print(f"time budget reached before {name} {dtype_name} {mode}", file=sys.stderr)
            break
        batch = args.batch or MODELS[name][3 if args.quick else 1]
        key = case_key(name, args.quick, dtype_name, mode, batch)
        if results.has(key) and not args.force:
            progress.update(f"{key} already measured")
            continue
        case = run_case(name, dtype_name, mode, device, args)
        results.add(case)
        summary = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in case["times"].items())
        progress.update(f"{key}: {summary}")
        print(f"{key}: {summary}; ratios {case['ratios']}; unavailable {list(case['unavailable'])}", file=sys.stderr)
    progress.close()
    results.finish(plot=not args.no_plot)
    print(results.path)
    return results.path


if __name__ == "__main__":
    main()
