"""The closed loop: panel logic (no I/O), `flywheel up` start/stop hygiene, and the whole loop learning.

- Panel tests use fake stubs: the judgments and the wire calls are checked without services.
- `test_up_twice_leaves_nothing_behind` starts the four services on the embedded Tansu broker,
  stops them, twice, and checks that no process or port is left; it also kills a child to see
  that its death is reported with its name and log.
- `test_loop_learns` runs the demo with the default settings on the real Apache Kafka broker: a new
  policy version must be promoted and swapped in, and the panel must prefer it to the starter.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
import uuid

import pytest

from flywheel.loop.panel import Panel, Persona, answer_stats, features, utility
from flywheel.policy import corpus

GOOD = "thank you for asking! click forgot password on the login page and follow the link we email you to set a new password. hope this helps!"
BAD = "ugh, fine. plant tomatoes in a sunny spot, water them every morning and tie them to a stick as they grow. there is really a lot to say here. some people think about this all day long."
PROMPT = "how do I reset my password?"


# ---------------------------------------------------------------------------- panel (no I/O)


def test_features_and_utility_follow_the_corpus_styles() -> None:
    f = features(PROMPT, GOOD)
    assert f == {"polite": 1.0, "rude": 0.0, "concise": 1.0, "on_topic": 1.0, "closing": 1.0, "malformed": 0.0}
    assert features(PROMPT, BAD)["rude"] == 1.0 and features(PROMPT, BAD)["on_topic"] == 0.0
    assert features(PROMPT, "")["malformed"] == 1.0
    assert features(PROMPT, "hope this helps. hope this helps. hope this helps.")["malformed"] == 1.0
    panel = Panel()
    assert all(utility(p, PROMPT, GOOD) > utility(p, PROMPT, BAD) for p in panel.personas)
    assert panel.hidden_utility(PROMPT, GOOD) > panel.hidden_utility(PROMPT, BAD)


def test_personas_disagree_but_share_a_consensus() -> None:
    verbose_polite = "happy to help! " + corpus.TOPICS["password"][2][0] + " let me tell you a bit more about this."
    concise_plain = corpus.TOPICS["password"][2][0]
    panel = Panel()
    by_name = {p.name: utility(p, PROMPT, verbose_polite) - utility(p, PROMPT, concise_plain) for p in panel.personas}
    assert by_name["chatter"] > 0 > by_name["engineer"]  # real disagreement


def test_noise_free_judgments_are_exact_and_noisy_ones_are_not() -> None:
    strict = Persona("strict", {"polite": 1, "rude": -2, "concise": 1, "on_topic": 2, "closing": 0.5}, 0.0, 0.0)
    panel = Panel([strict], seed=1)
    assert panel.prefer(strict, PROMPT, GOOD, BAD) == "A"
    assert panel.prefer(strict, PROMPT, BAD, GOOD) == "B"
    assert panel.prefer(strict, PROMPT, GOOD, GOOD) == "TIE"
    assert panel.thumbs(strict, PROMPT, GOOD) == 1 and panel.thumbs(strict, PROMPT, BAD) == -1
    assert panel.rating(strict, PROMPT, GOOD) == 3 and panel.rating(strict, PROMPT, BAD) == 1
    noisy = Persona("noisy", strict.weights, noise=3.0, careless=0.2)
    panel = Panel([noisy], seed=2)
    picks = [panel.prefer(noisy, PROMPT, GOOD, BAD) for _ in range(400)]
    assert 0.55 < picks.count("A") / len(picks) < 0.97  # mostly right, sometimes wrong


def test_demonstrations_are_what_the_persona_likes() -> None:
    panel = Panel(seed=3)
    for p in panel.personas:
        demo = panel.demonstration(p, PROMPT)
        assert utility(p, PROMPT, demo) >= max(utility(p, PROMPT, GOOD), utility(p, PROMPT, BAD)) - 1.0


def test_win_rate_splits_ties_and_orders_policies() -> None:
    rng = random.Random(0)
    bank = {PROMPT: [corpus.make_answer(rng, "password") for _ in range(200)]}
    panel = Panel()
    assert panel.win_rate([(PROMPT, a) for a in bank[PROMPT]], bank) == pytest.approx(0.5, abs=0.01)
    assert panel.win_rate([(PROMPT, GOOD)], bank) > 0.95
    assert panel.win_rate([(PROMPT, BAD)], bank) < 0.1


def test_answer_stats_show_rambling_and_loops() -> None:
    s = answer_stats(["a b c d", "x x x x x x"], ["eos_token", "length"])
    assert s["eos_rate"] == 0.5 and s["max_words"] == 6
    assert s["distinct2"] < 0.8


# ---------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and _pid_alive(int(d)):
                out.append(int(d))
    return out


@pytest.mark.timeout(600)
def test_up_restarts_a_dead_service_and_twice_leaves_nothing_behind(tmp_path) -> None:
    from flywheel.loop.supervisor import ChildDied, Supervisor, UpConfig, health_status, port_free, tail

    store = tmp_path / "models"
    for round_ in range(2):
        up = UpConfig(tmp_path / f"run{round_}", store=str(store), free_ports=True, progress=False)
        sup = Supervisor(dataclasses.replace(up, restarts=1 if round_ == 0 else 0, restart_backoff_s=0.2))
        sup.start()
        try:
            pids = {n: c.proc.pid for n, c in sup.children.items()}
            ports = [p for c in sup.children.values() for p in (c.grpc_port, c.http_port)]
            broker_pid, broker_port = sup.broker.proc.pid, sup.broker.port
            assert all(_pid_alive(p) for p in pids.values())
            feedback = sup.children["feedback"]
            if round_ == 0:  # a child that dies is restarted on its ports, once within the window
                os.killpg(pids["feedback"], signal.SIGKILL)
                deadline = time.monotonic() + 120
                while health_status(feedback.address, 1.0) != "SERVING" or feedback.proc.pid == pids["feedback"]:
                    sup.poll()
                    assert time.monotonic() < deadline, tail(feedback.log)
                    time.sleep(0.2)
                assert feedback.restarted_at and "restarting feedback (restart 1)" in tail(feedback.log, 100)
                pids["feedback_restarted"] = feedback.proc.pid
                os.killpg(feedback.proc.pid, signal.SIGKILL)  # a second exit within the window: a crash loop
            else:  # restarts=0: the first exit stops everything
                os.killpg(pids["feedback"], signal.SIGKILL)
            feedback.proc.wait(10)
            with pytest.raises(ChildDied) as err:
                sup.poll()
            assert err.value.name == "feedback" and err.value.code == -signal.SIGKILL
            assert err.value.restarts == (1 if round_ == 0 else 0)
            assert ("a crash loop" in str(err.value)) == (round_ == 0)
            assert "feedback listening" in str(err.value)
        finally:
            sup.stop()
        assert not [p for p in [*pids.values(), broker_pid] if _pid_alive(p)]
        assert not _procs_mentioning(str(tmp_path / f"run{round_}"))
        assert all(port_free(p) for p in [*ports, broker_port])


@pytest.fixture(scope="module")
def demo_report(kafka_bootstrap, tmp_path_factory) -> tuple[object, dict]:
    """The whole loop on real Kafka with the shipped training defaults and one clear-cut user, run once."""
    from flywheel.loop.demo import DemoConfig, run_demo

    prefix = f"t{uuid.uuid4().hex[:8]}."
    topics = {f"FLYWHEEL_TOPIC_{t.upper()}": prefix + n for t, n in _topic_defaults().items()}
    cfg = DemoConfig(
        out=tmp_path_factory.mktemp("loop") / "demo",
        # Stops early once 0.7 is confirmed on 150 answers; the limit is for slow runs. With the
        # defaults the first training step comes ~3 minutes in (the reward model must be ready):
        # 9 minutes gave 0.77 and 0.61, so 12.
        minutes=12.0,
        target_win_rate=0.7,
        max_events=6000,  # a run ends once they are spent: at 8/s they outlast the 12 minutes
        events_per_s=8.0,
        eval_every_s=20.0,
        eval_samples=6,
        final_eval_samples=30,
        bank_per_prompt=30,
        bootstrap=kafka_bootstrap,
        env={
            **topics,
            "FLYWHEEL_REWARD_JOIN_GROUP": prefix + "join",
            "FLYWHEEL_TRAINER_CONSUMER_GROUP": prefix + "tr",
        },  # topics and groups of its own; every training setting is the shipped default
        progress=True,
        # One clear-cut user (rudeness and off-topic answers are what it hates) so that a few
        # minutes of feedback on 2 cores are enough; the default panel is the demo's.
        personas=(Persona("tester", {"rude": -3.0, "on_topic": 2.0, "concise": 1.0}, noise=0.3, careless=0.0),),
        mix={"pair": 0.7, "thumbs": 0.15, "rating": 0.15},
    )
    return cfg, run_demo(cfg)


@pytest.mark.timeout(1200)
def test_loop_promotes_and_swaps_in_a_new_policy(demo_report) -> None:
    """A version trained from live feedback passes the gate, is announced and serves, inside the KL budget."""
    cfg, report = demo_report
    assert report["policy_versions_promoted"], report["series"]
    assert report["serving_version"] > 0  # the answers themselves carry the promoted version
    assert max(p["serving_version"] for p in report["series"]) > 0  # and Policy.GetInfo said so
    assert report["feedback_events"] > 0
    assert report["kl_to_starter"] < report["kl_budget"]
    assert report["answers"]["eos_rate"] > 0.9 and report["answers"]["distinct2"] > 0.8
    assert (cfg.out / "report.png").stat().st_size > 10_000


@pytest.mark.timeout(1200)
def test_loop_learns_what_the_panel_prefers(demo_report) -> None:
    """The panel prefers the promoted policy to the starter by a clear margin.

    Stochastic, on a few minutes of 2 CPU cores, with every training setting at its shipped
    default; the runs are in docs/bench/README.md.
    """
    _, report = demo_report
    summary = {k: v for k, v in report.items() if k not in ("series", "settings", "examples", "heldout_prompts")}
    summary["win_rates"] = [(p["t_s"], p["serving_version"], round(p["win_rate"], 2)) for p in report["series"]]
    # A clear margin: 0.6 on 150 comparisons is 2.5 standard errors above a coin flip.
    assert report["win_rate_vs_starter"] >= 0.6, summary
    assert report["hidden_utility"]["serving"] > report["hidden_utility"]["starter"], summary


def _topic_defaults() -> dict[str, str]:
    from flywheel.core.config import TopicsConfig

    d = TopicsConfig()
    return {
        "interactions": d.interactions,
        "feedback": d.feedback,
        "preferences": d.preferences,
        "policy_updates": d.policy_updates,
        "reward_updates": d.reward_updates,
        "dlq": d.dlq,
    }
