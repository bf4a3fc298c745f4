"""Does the loop learn its users' preferences with the shipped defaults? N runs of the demo loop per variant.

Each run is `flywheel demo` in-process (`flywheel.loop.demo.run_demo`): every service started
on its own ports and store, a simulated panel of users talking to them over the public gRPC APIs
only, with no override of any training setting (the defaults are what is measured; a `set:`
variant changes some, to measure an alternative side by side). The judge is
the panel's *hidden* utility, never the reward model: the final win-rate is the share of the
serving policy's answers to held-out prompts that beat the starter's (v0) answers to the same
prompts, ties counted half. Run i of a variant uses seed --seed + i; the runs are interleaved
(run 0 of every variant, then run 1, ...) so that a slower stretch of the machine hurts each
variant alike, and so that an interrupted sweep still has runs of every variant.

A run passes when, all at once:
  - win-rate >= the variant's target (--target for `default`, 0.7 for the others: a single
    persona's or a single feedback kind's signal is thinner than the whole panel's);
  - feedback events <= --max-events and minutes (start to report) <= --minutes;
  - the well-formed share of the served answers >= 0.95 x the starter's, measured in the same
    run on the starter bank (the baseline: learning must not come from garbled text);
  - KL of the serving version to the starter <= half the promotion gate's budget.

Variants (--variant, repeatable; default `default`):
  default                 the default panel (every default persona, default feedback mix)
  persona:NAME            that persona alone: its own utility is the judge
  persona:NAME:inverted   its taste inverted (every weight negated; garbled text still costs)
  only:pair|thumbs|rating the default panel giving only that kind of feedback
  set:NAME=VALUE[,...]     the default panel with settings changed from the defaults (an ablation)
  personas                every default persona alone and inverted (8 variants)
  kinds                   the three only:* variants

Writes OUT/VARIANT/run-I/report.json and report.png (the demo's own), then OUT/learning.json
(every run's row and the settings), OUT/learning.md (a table to paste into docs) and
OUT/learning.png (win-rate over time, every run). Exit code 0 if every run ran and passed, else 3.

    flywheel bench learning                                 # 5 runs of the default panel
    flywheel bench learning --runs 3 --variant personas --variant kinds --quiet
    .venv/bin/python bench/learning.py --runs 1 --minutes 10 --variant persona:engineer:inverted
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from flywheel.loop.panel import DEFAULT_PERSONAS, Persona, persona_named

KINDS = ("pair", "thumbs", "rating")
SINGLE_TARGET = 0.7  # win-rate target of every variant but `default` (judged by its own utility)
WELL_FORMED_RATIO = 0.95  # served answers' well-formed share, at least this x the starter's
KL_SHARE = 0.5  # KL to the starter, at most this share of the gate's budget

SPECS = (
    "default, persona:NAME, persona:NAME:inverted, only:KIND, set:NAME=VALUE[,...], personas or kinds "
    f"(NAME: {', '.join(p.name for p in DEFAULT_PERSONAS)}; KIND: {', '.join(KINDS)})"
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One panel setup: who judges (their hidden utility is the win-rate's judge) and how they give feedback."""

    name: str  # the spec it came from: "default", "persona:chatter:inverted", "only:pair"
    personas: tuple[Persona, ...]
    mix: dict[str, float] | None  # feedback kinds' shares; None: the panel's default mix
    target: float  # final win-rate to reach
    env: tuple[tuple[str, str], ...] = ()  # an ablation's settings changed from the defaults (set:...)

    @property
    def slug(self) -> str:
        """A directory name for it."""
        return self.name.replace(":", "-").replace("=", "-").replace(",", "+")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a run must stay within, whatever its variant."""

    max_events: int
    minutes: float
    well_formed_ratio: float = WELL_FORMED_RATIO
    kl_share: float = KL_SHARE


def parse_variant(spec: str, default_target: float) -> list[Variant]:
    """The variants a --variant spec stands for (a shorthand stands for several); ValueError if bad."""
    spec = spec.strip()
    parts = spec.split(":")
    head = parts[0]
    if spec == "default":
        return [Variant("default", DEFAULT_PERSONAS, None, default_target)]
    if spec == "personas":
        return [v for p in DEFAULT_PERSONAS for v in (_persona(p, False), _persona(p, True))]
    if spec == "kinds":
        return [_only(k) for k in KINDS]
    if head == "persona" and len(parts) in (2, 3):
        if len(parts) == 3 and parts[2] != "inverted":
            raise ValueError(f"bad variant {spec!r}: after persona:NAME only ':inverted' may follow")
        try:
            persona = persona_named(parts[1])
        except ValueError as e:
            raise ValueError(f"bad variant {spec!r}: {e}") from None
        return [_persona(persona, len(parts) == 3)]
    if head == "set" and len(parts) == 2:
        return [_ablation(spec, parts[1], default_target)]
    if head == "only" and len(parts) == 2:
        if parts[1] not in KINDS:
            raise ValueError(
                f"bad variant {spec!r}: unknown feedback kind {parts[1]!r}, choose one of {', '.join(KINDS)}"
            )
        return [_only(parts[1])]
    raise ValueError(f"bad variant {spec!r}: choose {SPECS}")


def _persona(p: Persona, inverted: bool) -> Variant:
    who = p.inverted() if inverted else p
    return Variant(f"persona:{p.name}" + (":inverted" if inverted else ""), (who,), None, SINGLE_TARGET)


def _ablation(spec: str, assignments: str, target: float) -> Variant:
    """set:NAME=VALUE,NAME=VALUE: the default panel with these settings changed (a defence measured
    side by side with the defaults). NAME is a FLYWHEEL_* variable (docs/CONFIG.md)."""
    env = []
    for item in assignments.split(","):
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("FLYWHEEL_") or not value:
            raise ValueError(f"bad variant {spec!r}: use set:FLYWHEEL_NAME=VALUE[,FLYWHEEL_NAME=VALUE...]")
        env.append((name, value))
    return Variant(spec, DEFAULT_PERSONAS, None, target, tuple(env))


def _only(kind: str) -> Variant:
    return Variant(f"only:{kind}", DEFAULT_PERSONAS, {kind: 1.0}, SINGLE_TARGET)


def parse_variants(specs: Sequence[str], default_target: float) -> list[Variant]:
    """Every spec's variants in order, each once."""
    out: dict[str, Variant] = {}
    for spec in specs:
        for v in parse_variant(spec, default_target):
            out.setdefault(v.name, v)
    return list(out.values())


def well_formed_ratio(report: dict[str, Any]) -> float:
    """Well-formed share of the served answers over the starter's (the same run's baseline)."""
    served, starter = report["answers"]["well_formed"], report["starter_answers"]["well_formed"]
    if starter > 0:
        return float(served / starter)
    return math.inf if served > 0 else 1.0


def verdict(report: dict[str, Any], target: float, limits: Limits) -> list[str]:
    """Why a run's report fails (empty: it passes); NaN figures fail."""
    wr, events, minutes = report["win_rate_vs_starter"], report["feedback_events"], report["minutes"]
    kl, budget = report["kl_to_starter"], report["kl_budget"]
    ratio = well_formed_ratio(report)
    reasons = []
    if not wr >= target:
        reasons.append(f"win-rate {wr:.3f} < {target:g}")
    if not events <= limits.max_events:
        reasons.append(f"events {events} > {limits.max_events}")
    if not minutes <= limits.minutes:
        reasons.append(f"minutes {minutes:.1f} > {limits.minutes:g}")
    if not ratio >= limits.well_formed_ratio:
        reasons.append(f"well-formed {ratio:.2f}x starter < {limits.well_formed_ratio:g}x")
    if not kl <= limits.kl_share * budget:
        reasons.append(
            f"KL {kl:.2f} > {limits.kl_share * budget:g} ({limits.kl_share:g} of the gate budget {budget:g})"
        )
    return reasons


def run_row(
    variant: Variant, seed: int, report: dict[str, Any], limits: Limits, interrupted: bool = False
) -> dict[str, Any]:
    """A run's summary row (what learning.json keeps and the tables show)."""
    reasons = verdict(report, variant.target, limits) + (["interrupted"] if interrupted else [])
    return {
        "variant": variant.name,
        "seed": seed,
        "target": variant.target,
        "win_rate": report["win_rate_vs_starter"],
        "win_rate_se": report["win_rate_se"],
        "win_rate_n": report["win_rate_n"],
        "feedback_events": report["feedback_events"],
        "minutes": report["minutes"],
        "kl_to_starter": report["kl_to_starter"],
        "kl_budget": report["kl_budget"],
        "well_formed": report["answers"]["well_formed"],
        "starter_well_formed": report["starter_answers"]["well_formed"],
        "well_formed_ratio": well_formed_ratio(report),
        "hidden_utility": report["hidden_utility"]["serving"],
        "starter_hidden_utility": report["hidden_utility"]["starter"],
        "promoted": len(report["policy_versions_promoted"]),
        "passed": not reasons,
        "reasons": reasons,
    }


def verdict_text(row: dict[str, Any]) -> str:
    return "PASS" if row["passed"] else "FAIL: " + "; ".join(row["reasons"])


def run_line(row: dict[str, Any]) -> str:
    """One printed line per run."""
    return (
        f"{row['variant']} seed {row['seed']}: win-rate {row['win_rate']:.3f}±{row['win_rate_se']:.3f} "
        f"(target {row['target']:g}), {row['feedback_events']} events, {row['minutes']:.1f} min, "
        f"KL {row['kl_to_starter']:.2f} (gate budget {row['kl_budget']:g}), well-formed {row['well_formed']:.2f} "
        f"vs starter {row['starter_well_formed']:.2f} ({row['well_formed_ratio']:.2f}x), "
        f"{row['promoted']} versions promoted: {verdict_text(row)}"
    )


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, in order of first appearance: runs passed, median minutes and win-rate, worst win-rate."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    return [
        {
            "variant": name,
            "runs": len(rs),
            "passed": sum(r["passed"] for r in rs),
            "median_minutes": statistics.median(r["minutes"] for r in rs),
            "median_win_rate": statistics.median(r["win_rate"] for r in rs),
            "worst_win_rate": min(r["win_rate"] for r in rs),
            "target": rs[0]["target"],
        }
        for name, rs in by.items()
    ]


def summary_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    head = f"{'variant':28s} {'passed':>7s} {'median min':>11s} {'median win-rate':>16s} {'worst win-rate':>15s} {'target':>7s}"
    return [head] + [
        f"{s['variant']:28s} {s['passed']:>3d}/{s['runs']:<3d} {s['median_minutes']:11.1f} "
        f"{s['median_win_rate']:16.3f} {s['worst_win_rate']:15.3f} {s['target']:7g}"
        for s in summary
    ]


def markdown(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], caption: str = "") -> str:
    """learning.md: one row per run (grouped by variant, in order of seed), then one per variant."""
    order = {s["variant"]: i for i, s in enumerate(summary)}
    rows = sorted(rows, key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))
    out = [caption, ""] if caption else []
    out += [
        "| variant | seed | win-rate | events | minutes | KL / budget | well-formed vs starter | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['variant']} | {r['seed']} | {r['win_rate']:.3f} ± {r['win_rate_se']:.3f} | {r['feedback_events']} "
            f"| {r['minutes']:.1f} | {r['kl_to_starter']:.2f} / {r['kl_budget']:g} "
            f"| {r['well_formed']:.2f} vs {r['starter_well_formed']:.2f} ({r['well_formed_ratio']:.2f}x) "
            f"| {verdict_text(r).replace('|', '/')} |"
        )
    out += ["", "| variant | passed | median minutes | median win-rate | worst win-rate | target |"]
    out += ["|---|---:|---:|---:|---:|---:|"]
    out += [
        f"| {s['variant']} | {s['passed']}/{s['runs']} | {s['median_minutes']:.1f} | {s['median_win_rate']:.3f} "
        f"| {s['worst_win_rate']:.3f} | {s['target']:g} |"
        for s in summary
    ]
    return "\n".join(out) + "\n"


def plot(curves: Sequence[tuple[str, float, list[dict[str, Any]]]], path: Path) -> None:
    """learning.png: win-rate over minutes, one line per run (variant, target, the report's series); one
    colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    colours: dict[str, Any] = {}
    cmap = plt.get_cmap("tab20")
    for variant, _, series in curves:
        first = variant not in colours
        colour = colours.setdefault(variant, cmap(len(colours) % 20))
        runs = sum(c[0] == variant for c in curves)
        label = f"{variant} ({runs} run{'s' if runs > 1 else ''})" if first else None
        ax.plot([p["t_s"] / 60 for p in series], [p["win_rate"] for p in series], ".-", lw=1, c=colour, label=label)
    for target in sorted({t for _, t, _ in curves}):
        ax.axhline(target, ls="--", c="gray", lw=1)
    ax.axhline(0.5, ls=":", c="gray", lw=1)
    ax.set(
        xlabel="minutes since the panel started",
        ylabel="win-rate vs starter (hidden utility)",
        ylim=(0, 1),
        title=f"Flywheel learning: {len(curves)} runs (dashed: targets)",
    )
    if curves:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[Variant]]:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=5, help="runs per variant")
    ap.add_argument("--out", type=Path, default=Path("runs/learning"), help="output directory")
    ap.add_argument("--minutes", type=float, default=20.0, help="time limit of a run (and its pass criterion)")
    ap.add_argument("--max-events", type=int, default=3000, help="the panel's feedback budget per run")
    ap.add_argument("--events-per-s", type=float, default=4.0, help="feedback events per second, all users")
    ap.add_argument("--target", type=float, default=0.8, help="win-rate target of the default variant")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first run (run i: seed + i)")
    ap.add_argument("--variant", action="append", metavar="SPEC", help=f"repeatable: {SPECS}; default: default")
    ap.add_argument("--quiet", action="store_true", help="no live progress of each run")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    try:
        variants = parse_variants(args.variant or ["default"], args.target)
    except ValueError as e:
        ap.error(str(e))
    return args, variants


@dataclasses.dataclass
class Sweep:
    """What the runs gathered so far, and how to write it out."""

    out: Path
    settings: dict[str, Any]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    curves: list[tuple[str, float, list[dict[str, Any]]]] = dataclasses.field(default_factory=list)
    stopped: str = ""

    def add(self, row: dict[str, Any], report: dict[str, Any]) -> None:
        self.rows.append(row)
        self.curves.append((row["variant"], row["target"], report.get("series") or []))
        self.settings.setdefault("demo_settings", report.get("settings", {}))

    def caption(self) -> str:
        s = self.settings
        text = (
            f"`flywheel bench learning`: {len(self.rows)} runs, at most {s['max_events']} feedback events at "
            f"{s['events_per_s']:g}/s and {s['minutes']:g} min a run; win-rate vs the starter by the panel's hidden "
            f"utility; pass: win-rate >= target, well-formed >= {WELL_FORMED_RATIO:g}x the starter's, "
            f"KL <= {KL_SHARE:g} x the gate budget."
        )
        return text + (f" Stopped early: {self.stopped}." if self.stopped else "")

    def write(self) -> dict[str, Any]:
        summary = summarize(self.rows)
        result = {"settings": self.settings, "rows": self.rows, "summary": summary, "stopped": self.stopped or None}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "learning.json").write_text(json.dumps(result, indent=2))
        (self.out / "learning.md").write_text(markdown(self.rows, summary, self.caption()))
        plot(self.curves, self.out / "learning.png")
        return result


def settings_of(args: argparse.Namespace, variants: Sequence[Variant], limits: Limits) -> dict[str, Any]:
    return {
        "runs": args.runs,
        "minutes": args.minutes,
        "max_events": args.max_events,
        "events_per_s": args.events_per_s,
        "seeds": [args.seed + i for i in range(args.runs)],
        "bootstrap": os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", "") or "embedded",
        "limits": dataclasses.asdict(limits),
        "variants": [
            {
                "name": v.name,
                "personas": [p.name for p in v.personas],
                "mix": v.mix,
                "target": v.target,
                "env": dict(v.env),
            }
            for v in variants
        ],
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plan(variants: Sequence[Variant], runs: int, seed: int) -> Iterator[tuple[int, Variant, int]]:
    """(run index, variant, seed), interleaved: run 0 of every variant, then run 1, ..."""
    for i in range(runs):
        for v in variants:
            yield i, v, seed + i


class StopOnSignal:
    """SIGINT/SIGTERM once: the run in progress ends early (with its final evaluation) and no other starts.
    Twice: KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print("\nstopping: the run in progress ends with its final evaluation (again to abort it)", flush=True)

    def __enter__(self) -> StopOnSignal:
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    args, variants = parse_args(argv)
    from flywheel.loop.demo import DemoConfig, run_demo
    from flywheel.loop.supervisor import ChildDied

    limits = Limits(max_events=args.max_events, minutes=args.minutes)
    sweep = Sweep(args.out, settings_of(args, variants, limits))
    planned = args.runs * len(variants)
    with StopOnSignal() as stop:
        try:
            for i, v, seed in plan(variants, args.runs, args.seed):
                run_dir = args.out / v.slug / f"run-{i}"
                print(f"== {v.name} run {i} (seed {seed}) -> {run_dir}", flush=True)
                cfg = DemoConfig(
                    out=run_dir,
                    minutes=args.minutes,
                    target_win_rate=v.target,
                    max_events=args.max_events,
                    events_per_s=args.events_per_s,
                    progress=not args.quiet,
                    seed=seed,
                    personas=v.personas,
                    mix=v.mix,
                    bootstrap=os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", ""),
                    env=dict(v.env),
                )
                report = run_demo(cfg, stop.event)
                row = run_row(v, seed, report, limits, interrupted=stop.event.is_set())
                sweep.add(row, report)
                print(run_line(row), flush=True)
                sweep.write()
                if stop.event.is_set():
                    sweep.stopped = f"interrupted after {len(sweep.rows)} of {planned} runs"
                    break
        except ChildDied as e:
            print(f"error: {e}", file=sys.stderr)
            sweep.stopped = f"{e}".splitlines()[0]
        except KeyboardInterrupt:
            sweep.stopped = f"aborted after {len(sweep.rows)} of {planned} runs"
        finally:
            sweep.write()
    print()
    print("\n".join(summary_lines(summarize(sweep.rows))))
    if sweep.stopped:
        print(f"stopped early: {sweep.stopped}")
    print(f"results: {args.out / 'learning.json'}, {args.out / 'learning.md'}, {args.out / 'learning.png'}")
    complete = len(sweep.rows) == planned and not sweep.stopped
    return 0 if complete and all(r["passed"] for r in sweep.rows) else 3


if __name__ == "__main__":
    sys.exit(main())
