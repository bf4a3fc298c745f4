"""`flywheel demo`: `up` plus the simulated panel, live progress, and DIR/report.json + report.png.

The proof that the loop learns is the panel's *hidden* utility: every evaluation samples the
serving policy on prompts the panel never rated (over Policy.Generate, like any client) and
compares each answer with a bank of starter (v0) answers to the same prompt, ties counted
half. The reward model's own score never enters the win-rate.

The services run with the shipped defaults (DEMO_SETTINGS lists the one exception and why): the
trainer waits by itself until the reward model has learned something (trainer.reward_min_*),
and the demo pauses it (Trainer.Pause with the admin token) for the final evaluation, so that one
version answers all of it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flywheel.loop.panel import (
    DEFAULT_PERSONAS,
    Panel,
    PanelClient,
    PanelConfig,
    Persona,
    answer_stats,
    starter_bank,
)
from flywheel.loop.supervisor import ChildDied, Supervisor, UpConfig
from flywheel.policy import corpus
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.prompt_sources import split_pool

# What the demo sets in its services' environment, each with why it is about the demo and not
# about learning: the demo runs the shipped defaults (trainer/config.py says why they are what
# they are), and tests/unit/test_demo_settings.py fails on an override without a reason.
DEMO_SETTINGS: dict[str, tuple[str, str]] = {
    "FLYWHEEL_TRAINER_PROMPT_SOURCE": (
        "pool",
        "the evaluation asks the policy for answers to held-out prompts over the public API, so they reach "
        "flywheel.interactions too: the trainer takes its prompts from the demo's training pool instead, "
        "never from the prompts it is judged on",
    ),
}
DEMO_ENV = {name: value for name, (value, _) in DEMO_SETTINGS.items()}


@dataclasses.dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    minutes: float = 20.0
    target_win_rate: float = 0.8
    # Stop only when a check's win-rate is this many standard errors above the target: a check
    # that merely touches it is a coin flip, and the final, independent evaluation then falls
    # below (stopping on a noisy check favours a lucky one: 0.81 -> 0.77, 0.82 -> 0.80 seen).
    confirm_margin_se: float = 1.0
    max_events: int = 3000  # the panel gives no more feedback; the run ends at the next check
    events_per_s: float = 4.0
    eval_every_s: float = 30.0
    eval_samples: int = 8  # answers per held-out prompt per evaluation
    final_eval_samples: int = 40
    bank_per_prompt: int = 40  # starter answers per held-out prompt
    heldout_prompts: int = 5
    bootstrap: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    progress: bool = True
    seed: int = 0
    personas: tuple[Persona, ...] = DEFAULT_PERSONAS  # the panel (its hidden utility judges the win-rate)
    mix: dict[str, float] | None = None  # feedback kinds' shares (None: PanelConfig's)
    temperature: float = 1.0  # how the panel's users (and the starter bank) sample answers


class Services:
    """gRPC stubs of the running loop (public APIs only; the admin token for Trainer)."""

    def __init__(self, sup: Supervisor) -> None:
        from flywheel.core.tls import channel
        from flywheel.v1 import policy_pb2_grpc, reward_pb2_grpc, trainer_pb2_grpc

        self._chans = [channel(sup.children[n].address) for n in ("policy", "reward", "trainer")]
        self.policy = policy_pb2_grpc.PolicyStub(self._chans[0])
        self.reward = reward_pb2_grpc.RewardStub(self._chans[1])
        self.trainer = trainer_pb2_grpc.TrainerStub(self._chans[2])
        self.admin = (("authorization", f"Bearer {sup.admin_token}"),)

    def reward_info(self) -> Any:
        from flywheel.v1 import reward_pb2

        return self.reward.GetInfo(reward_pb2.RewardInfoRequest(), timeout=10, metadata=self.admin)

    def policy_version(self) -> int:
        from flywheel.v1 import policy_pb2

        return self.policy.GetInfo(policy_pb2.GetInfoRequest(), timeout=10).policy_version

    def trainer_status(self) -> Any:
        from flywheel.v1 import trainer_pb2

        return self.trainer.GetStatus(trainer_pb2.GetStatusRequest(), metadata=self.admin, timeout=10)

    def pause_trainer(self, reason: str) -> int:
        """Pause (returns after the step in progress); the version the replicas are told to serve."""
        from flywheel.v1 import trainer_pb2

        req = trainer_pb2.PauseRequest(reason=reason)
        return self.trainer.Pause(req, metadata=self.admin, timeout=120).serving_version

    def close(self) -> None:
        for c in self._chans:
            c.close()


def evaluate(client: PanelClient, panel: Panel, bank: dict[str, list[str]], samples: int) -> dict[str, Any]:
    """Win-rate of the serving policy against the starter bank, by the panel's hidden utility."""
    jobs = [p for p in bank for _ in range(samples)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: client.generate(p, "panel-eval"), jobs))
    versions = [a.policy_version for a in answers]
    pairs = [(p, a.text) for p, a in zip(jobs, answers, strict=True)]
    wr = panel.win_rate(pairs, bank)
    n = len(pairs)
    return {
        "win_rate": wr,
        "win_rate_se": math.sqrt(max(wr * (1 - wr), 1e-9) / n),
        "n": n,
        "version": max(set(versions), key=versions.count),
        "hidden_utility": sum(panel.hidden_utility(p, t) for p, t in pairs) / n,
        **answer_stats([t for _, t in pairs], [a.finish_reason for a in answers]),
        "examples": [t for _, t in pairs[:: max(1, samples)]][:5],
    }


def serving_kl(store: Path, version: int) -> float:
    """KL to the starter of a version, as the trainer's gate measured it on held-out prompts (nats)."""
    if version == 0:
        return 0.0
    m = json.loads((store / "policy" / f"v{version:06d}" / "manifest.json").read_text())
    return float(m.get("metrics", {}).get("gate.kl", float("nan")))


def promoted_versions(store: Path) -> list[int]:
    out = []
    for d in sorted((store / "policy").glob("v*/manifest.json")):
        m = json.loads(d.read_text())
        if m.get("promoted") and m["version"] > 0:
            out.append(m["version"])
    return out


def run_demo(cfg: DemoConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the loop with the panel until the target or the time limit; write and return the report."""
    stop = stop or threading.Event()
    out = Path(cfg.out)
    shutil.rmtree(out / "run", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, heldout = split_pool(corpus.prompts(), cfg.heldout_prompts, cfg.seed + 7)
    env = {**DEMO_ENV, **cfg.env}
    up = UpConfig(
        run_dir=out / "run",
        bootstrap=cfg.bootstrap,
        free_ports=True,
        env=env,
        config_yaml={"trainer": {"prompt_pool": train_prompts}},
        progress=cfg.progress,
    )
    import grpc

    say = print if cfg.progress else (lambda *a, **k: None)
    t_start = time.monotonic()
    sup = Supervisor(up)
    series: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    threads: list[threading.Thread] = []
    panel_stop = threading.Event()
    client = svc = None
    try:
        sup.start()
        say(sup.endpoints().split("\n\n")[0])
        panel = Panel(cfg.personas, seed=cfg.seed)
        pcfg = PanelConfig(
            prompts=train_prompts,
            events_per_s=cfg.events_per_s,
            max_events=cfg.max_events,
            temperature=cfg.temperature,
        )
        if cfg.mix is not None:
            pcfg.mix = dict(cfg.mix)
        say(f"starter bank: {cfg.bank_per_prompt} answers x {len(heldout)} held-out prompts ...", flush=True)
        bank = starter_bank(
            str(sup.store / "policy" / "v000000"), heldout, cfg.bank_per_prompt, pcfg.max_new_tokens, pcfg.temperature
        )
        client = PanelClient.connect(panel, pcfg, sup.children["policy"].address, sup.children["feedback"].address)
        svc = Services(sup)
        t0 = time.monotonic()
        threads = client.start(panel_stop)
        say(f"panel: {len(panel.personas)} personas, {pcfg.workers} users, {cfg.events_per_s:g} events/s")
        waiting, hits, next_eval = "", 0, t0
        deadline = t_start + cfg.minutes * 60
        while not stop.is_set() and time.monotonic() < deadline:
            sup.poll()
            try:
                info, st = svc.reward_info(), svc.trainer_status()
                if (st.state == "waiting") != bool(waiting):  # the trainer waits for a reward model worth it
                    say(
                        f"trainer {'waiting: ' + st.waiting_for if st.state == 'waiting' else 'training'} "
                        f"at {client.events} events",
                        flush=True,
                    )
                    waiting = st.waiting_for if st.state == "waiting" else ""
                if time.monotonic() >= next_eval:
                    ev = evaluate(client, panel, bank, cfg.eval_samples)
                    point = {
                        "t_s": round(time.monotonic() - t0, 1),
                        "feedback_events": client.events,
                        "serving_version": svc.policy_version(),
                        "reward_version": info.reward_version,
                        "reward_accuracy": info.heldout_accuracy,
                        "pairs_trained": info.pairs_trained,
                        "trainer_step": st.step,
                        "trainer_reward_mean": st.metrics.get("reward_mean", float("nan")),
                        "trainer_kl": st.metrics.get("kl", float("nan")),
                        "kl_to_starter": serving_kl(sup.store, ev["version"]),
                        **{k: v for k, v in ev.items() if k != "examples"},
                    }
                    series.append(point)
                    say(
                        f"[{point['t_s']:6.0f}s] feedback {client.events:5d}  reward v{info.reward_version} "
                        f"acc {info.heldout_accuracy:.2f}  trainer step {st.step}  serving v{point['serving_version']}  "
                        f"win-rate {ev['win_rate']:.2f}±{ev['win_rate_se']:.2f}  KL {point['kl_to_starter']:.2f}  "
                        f"words {ev['mean_words']:.0f}",
                        flush=True,
                    )
                    hits = hits + 1 if ev["win_rate"] >= cfg.target_win_rate and ev["version"] > 0 else 0
                    if hits >= 2:  # two small evaluations are noisy (±0.06): confirm on the final's sample size
                        check = evaluate(client, panel, bank, cfg.final_eval_samples)
                        lower = check["win_rate"] - cfg.confirm_margin_se * check["win_rate_se"]
                        seen = f"win-rate {check['win_rate']:.2f} over {check['n']} answers (lower bound {lower:.2f})"
                        if lower >= cfg.target_win_rate:
                            say(f"target confirmed: {seen}")
                            break
                        say(f"not confirmed: {seen}; going on")
                        hits = 0
                    next_eval = time.monotonic() + cfg.eval_every_s
                    if client.events >= cfg.max_events:  # no more feedback: what serves now is the result
                        say(f"feedback budget of {cfg.max_events} events spent")
                        break
            except grpc.RpcError as e:  # a service restarted by the supervisor: wait for it
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                say(f"waiting for a service: {e.code().name} ({e.details()})", flush=True)
            stop.wait(1.0)
        panel_stop.set()
        # The final evaluation measures one version: the trainer promotes nothing more, and the
        # answers wait until the replica serves what the trainer last promoted.
        final_version = svc.pause_trainer("demo: final evaluation")
        settle = time.monotonic() + 60
        while svc.policy_version() != final_version and time.monotonic() < settle:
            time.sleep(0.5)
        say(f"final evaluation of v{svc.policy_version()} (trainer paused) ...", flush=True)
        final = evaluate(client, panel, bank, cfg.final_eval_samples)
        elapsed = time.monotonic() - t_start
        report = {
            "win_rate_vs_starter": final["win_rate"],
            "win_rate_se": final["win_rate_se"],
            "win_rate_n": final["n"],
            "target_win_rate": cfg.target_win_rate,
            "feedback_events": client.events,
            "feedback_by_kind": client.by_kind,
            "feedback_errors": len(client.errors),
            "policy_versions_promoted": promoted_versions(sup.store),
            "serving_version": final["version"],
            "kl_to_starter": serving_kl(sup.store, final["version"]),
            "kl_budget": float(env.get("FLYWHEEL_TRAINER_GATE_KL_BUDGET", TrainerConfig().gate_kl_budget)),
            "answers": {k: final[k] for k in ("mean_words", "max_words", "distinct2", "well_formed", "eos_rate")},
            "starter_answers": answer_stats([a for v in bank.values() for a in v]),
            "hidden_utility": {"serving": final["hidden_utility"], "starter": _bank_utility(panel, bank)},
            "examples": final["examples"],
            "heldout_prompts": heldout,
            "minutes": elapsed / 60,
            "minutes_limit": cfg.minutes,
            "settings": env,
            "series": series,
        }
    finally:
        panel_stop.set()
        for t in threads:
            t.join(timeout=70)
        for c in (client, svc):
            if c is not None:
                c.close()
        sup.stop()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "report.png")
    return report


def _bank_utility(panel: Panel, bank: dict[str, list[str]]) -> float:
    vals = [panel.hidden_utility(p, a) for p, answers in bank.items() for a in answers]
    return sum(vals) / len(vals)


def plot(report: dict[str, Any], path: Path) -> None:
    """Win-rate, reward and KL over time (matplotlib Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.get("series") or []
    t = [p["t_s"] / 60 for p in s]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(t, [p["win_rate"] for p in s], "o-", label="panel win-rate vs starter")
    ax[0].axhline(report.get("target_win_rate", 0.8), ls="--", c="gray", label="target")
    ax[0].axhline(0.5, ls=":", c="gray")
    ax[0].set(
        xlabel="minutes since the panel started",
        ylabel="win-rate (hidden utility)",
        ylim=(0, 1),
        title="Win-rate vs starter",
    )
    ax[0].legend(loc="lower right")
    ax[1].plot(t, [p["trainer_reward_mean"] for p in s], "o-", label="trainer rollout reward (RM score)")
    acc = [p["reward_accuracy"] if p["reward_accuracy"] >= 0 else float("nan") for p in s]  # -1: not measured yet
    ax[1].plot(t, acc, "s-", label="reward model held-out accuracy")
    ax[1].set(xlabel="minutes", title="Reward")
    ax[1].legend()
    ax[2].plot(t, [p["kl_to_starter"] for p in s], "o-", label="serving version (gate)")
    ax[2].plot(t, [p["trainer_kl"] for p in s], ".-", label="trainer rollouts")
    ax[2].axhline(report.get("kl_budget", 12.0), ls="--", c="gray", label="budget")
    ax[2].set(xlabel="minutes", ylabel="nats per answer", title="KL to starter")
    ax[2].legend()
    wr, ev = report.get("win_rate_vs_starter", float("nan")), report.get("feedback_events", 0)
    fig.suptitle(f"Flywheel demo: win-rate {wr:.0%} after {ev} feedback events, {report.get('minutes', 0):.1f} min")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo_config(args: Any) -> DemoConfig:
    """The demo's settings from `flywheel demo`'s arguments."""
    adapter = getattr(args, "adapter", None)
    return DemoConfig(
        out=Path(getattr(args, "out", None) or "runs/demo"),
        minutes=float(getattr(args, "minutes", None) or 20.0),
        max_events=int(getattr(args, "max_events", None) or 3000),
        events_per_s=float(getattr(args, "events_per_s", None) or 4.0),
        target_win_rate=float(getattr(args, "target", None) or 0.8),
        bootstrap=os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", ""),
        env={"FLYWHEEL_TRAINER_ADAPTER": adapter} if adapter else {},
    )


def demo_main(args: Any) -> int:
    """`flywheel demo --minutes N --out DIR [--adapter lora]`: run, print the summary, 0 if the target was reached."""
    cfg = demo_config(args)
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = run_demo(cfg, stop)
    except ChildDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(
        f"\nwin-rate vs starter {report['win_rate_vs_starter']:.1%} (n={report['win_rate_n']}), "
        f"{report['feedback_events']} feedback events, {report['minutes']:.1f} min, "
        f"versions promoted {report['policy_versions_promoted']}, KL {report['kl_to_starter']:.2f} nats "
        f"(budget {report['kl_budget']:g})\nreport: {cfg.out / 'report.json'}, {cfg.out / 'report.png'}"
    )
    return 0 if report["win_rate_vs_starter"] >= cfg.target_win_rate else 3
