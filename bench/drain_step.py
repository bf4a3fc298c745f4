"""The cost of a decode step while a hot swap drains, against a steady step, in process.

After a swap the answers in flight finish on the old weights while new answers start on the new
ones. This times one decode step (forward + next-token selection, as the engine runs it) of
--rows sequences, --old-rows of them on the old version:
  - steady: all rows on one version, one forward,
  - separate: one batch and one forward per version (FLYWHEEL_POLICY_MIXED_DRAIN=false),
  - mixed: one batch, one forward whose weighted modules run the old rows on the old weights
    (`flywheel.policy.mixed`, the default); its norm layers run once with a weight per row,
  - mixed_norms_routed: the same with the norm layers routed like the other weighted modules
    (each runs twice on part of the rows; the default until stop 17),
interleaved, --repeat times, medians. Prints each as a ratio to steady. With --profile, also where
a steady step's time goes (torch.profiler): the ops with the most self CPU time, their device time
and calls per step, and the part of the step spent outside any op (Python, the launch path): on
the GPU of stop 10 a decode step of 32 sequences took 100 ms, cause not established.

    .venv/bin/python bench/drain_step.py
    .venv/bin/python bench/drain_step.py --hidden 256 --layers 4
    .venv/bin/python bench/drain_step.py --hidden 1280 --layers 24 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from serving import make_model, report  # noqa: E402

from flywheel.policy.config import EngineConfig  # noqa: E402
from flywheel.policy.kvbatch import Batch, LoadedModel, load_model  # noqa: E402
from flywheel.policy.mixed import MixedForward  # noqa: E402
from flywheel.policy.sampling import SamplingParams, select_next  # noqa: E402


class Row:  # what a Batch reads of a sequence
    def __init__(self, prompt_ids: list[int], model: LoadedModel) -> None:
        self.prompt_ids, self.model = prompt_ids, model


def perturbed_copy(src: Path, out: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def batch(m: LoadedModel, n: int, first: int) -> Batch:
    b = Batch.prefill(m, [Row(list(range(first + i, first + i + 24)), m) for i in range(n)])
    b.next_ids = b.last_logits.argmax(-1)
    return b


def timed(batches: list[Batch], steps: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds per decode step of all `batches` (one forward + selection each), sampled at T=0.7,
    after `warmup` untimed decode steps."""
    for _ in range(warmup):
        for b in batches:
            b.decode()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        for b in batches:
            n = len(b.seqs)
            params, seen = [SamplingParams(temperature=0.7, do_sample=True)] * n, [torch.tensor([1])] * n
            gens = [torch.Generator(device=device).manual_seed(i) for i in range(n)]
            b.next_ids, _ = select_next(b.decode(), params, seen, gens, False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def profile_steady(make: Callable[[], list[Batch]], steps: int, device: torch.device, top: int = 12) -> dict:
    """Where a steady step's time goes: the `top` ops by self CPU time, per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batches = make()
    timed(batches, 1, device)  # warm-up outside the profile, so that it holds `steps` steps only
    with profile(activities=acts) as prof:
        wall = timed(batches, steps, device, warmup=0)
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events) / 1000 / steps  # ms
    dev = (lambda e: getattr(e, "self_device_time_total", 0)) if cuda else (lambda e: 0)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "profiled_step_ms": round(wall * 1000, 3),  # the profiler's own overhead included
        "in_ops_self_cpu_ms_per_step": round(in_ops, 3),
        "outside_ops_ms_per_step": round(wall * 1000 - in_ops, 3),
        "device_ms_per_step": round(sum(dev(e) for e in events) / 1000 / steps, 3),
        "top_ops_by_self_cpu": [
            {
                "op": e.key,
                "calls_per_step": round(e.count / steps, 1),
                "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3),
                "device_ms_per_step": round(dev(e) / 1000 / steps, 3),
            }
            for e in rows
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--old-rows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40, help="decode steps per measurement")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--profile", action="store_true", help="also profile a steady step (torch.profiler)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-drain-"))
    cfg = EngineConfig(device=args.device, dtype=args.dtype)
    old_path = make_model(root / "old", args.hidden, args.layers)
    old = load_model(str(old_path), 0, cfg)
    new = load_model(str(perturbed_copy(old_path, root / "new")), 1, cfg)
    mix = MixedForward.pair(old, new)
    if mix is None:
        raise SystemExit("these two versions cannot share a forward (modules not routable)")
    k, n = args.old_rows, args.rows

    norms_routed = MixedForward(old, new, old.routable_modules, ())

    def mixed_batch(mix: MixedForward = mix) -> Batch:
        b = batch(old, k, 0)
        b.adopt(mix)
        b.merge(batch(new, n - k, k))
        return b

    # Caches grow by a token a step: each measurement starts from fresh batches of the same lengths.
    cases = {
        "steady": lambda: [batch(new, n, 0)],
        "separate": lambda: [batch(old, k, 0), batch(new, n - k, k)],
        "mixed": lambda: [mixed_batch()],
        "mixed_norms_routed": lambda: [mixed_batch(norms_routed)],
    }
    times: dict[str, list[float]] = {c: [] for c in cases}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for c, make in cases.items():
                times[c].append(timed(make(), args.steps, old.device))
    med = {c: statistics.median(t) for c, t in times.items()}
    out = {
        "device": torch.cuda.get_device_name(0) if old.device.type == "cuda" else "cpu",
        "dtype": str(old.dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in old.model.parameters()),
        "rows": n,
        "old_rows": k,
        "steady_step_ms": round(med["steady"] * 1000, 3),
        "separate_step_ms": round(med["separate"] * 1000, 3),
        "mixed_step_ms": round(med["mixed"] * 1000, 3),
        "separate_vs_steady": round(med["separate"] / med["steady"], 2),
        "mixed_vs_steady": round(med["mixed"] / med["steady"], 2),
        "mixed_norms_routed_vs_steady": round(med["mixed_norms_routed"] / med["steady"], 2),
        "norms_row_weighted": len(old.row_weighted),
    }
    if args.profile:
        with torch.inference_mode():
            out["steady_step_profile"] = profile_steady(cases["steady"], args.steps, old.device)
    report(out, args.out, root)


if __name__ == "__main__":
    main()
