"""bench/learning.py's pure parts (variants, verdicts, tables) and the panel's inverted personas: no services."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from flywheel.loop import panel
from flywheel.loop.panel import DEFAULT_PERSONAS, Persona, persona_named
from flywheel.policy import corpus

BENCH = Path(__file__).resolve().parents[2] / "bench" / "learning.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("bench_learning", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


learning = _load()
NAMES = [p.name for p in DEFAULT_PERSONAS]
LIMITS = learning.Limits(max_events=3000, minutes=20.0)


# -- variants ---------------------------------------------------------------------------------


def test_default_variant_is_the_default_panel_at_the_cli_target():
    [v] = learning.parse_variant("default", 0.8)
    assert (v.name, v.personas, v.mix, v.target, v.slug) == ("default", DEFAULT_PERSONAS, None, 0.8, "default")


def test_persona_variant_is_that_persona_alone_judged_by_itself_at_0_7():
    [v] = learning.parse_variant("persona:engineer", 0.8)
    assert v.name == "persona:engineer" and v.personas == (persona_named("engineer"),)
    assert v.mix is None and v.target == 0.7 and v.slug == "persona-engineer"


def test_inverted_persona_variant():
    [v] = learning.parse_variant("persona:chatter:inverted", 0.8)
    assert v.name == "persona:chatter:inverted" and v.slug == "persona-chatter-inverted"
    assert v.personas == (persona_named("chatter").inverted(),) and v.target == 0.7


@pytest.mark.parametrize("kind", ["pair", "thumbs", "rating"])
def test_only_kind_variant_is_the_default_panel_with_one_feedback_kind(kind):
    [v] = learning.parse_variant(f"only:{kind}", 0.8)
    assert v.personas == DEFAULT_PERSONAS and v.mix == {kind: 1.0} and v.target == 0.7
    assert v.slug == f"only-{kind}"


def test_shorthands():
    personas = learning.parse_variant("personas", 0.8)
    assert [v.name for v in personas] == [f"persona:{n}{s}" for n in NAMES for s in ("", ":inverted")]
    assert len(personas) == 8
    assert [v.name for v in learning.parse_variant("kinds", 0.8)] == ["only:pair", "only:thumbs", "only:rating"]


def test_variants_keep_order_and_come_once():
    vs = learning.parse_variants(["default", "persona:customer", "personas", "only:pair", "kinds"], 0.85)
    names = [v.name for v in vs]
    assert len(names) == len(set(names)) == 1 + 8 + 3
    assert names[:3] == ["default", "persona:customer", "persona:customer:inverted"]
    assert vs[0].target == 0.85


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "choose default, persona:NAME"),
        ("nope", "choose default, persona:NAME"),
        ("persona", "choose default, persona:NAME"),
        ("persona:nobody", "unknown persona 'nobody': choose one of customer, engineer, chatter, stickler"),
        ("persona:customer:upside-down", "only ':inverted' may follow"),
        ("persona:customer:inverted:again", "choose default"),
        ("only:demonstration", "unknown feedback kind 'demonstration', choose one of pair, thumbs, rating"),
        ("only", "choose default"),
        ("default:x", "choose default"),
    ],
)
def test_bad_variant_specs_say_what_is_wrong(spec, says):
    with pytest.raises(ValueError, match="bad variant") as e:
        learning.parse_variant(spec, 0.8)
    assert says in str(e.value)


def test_a_bad_variant_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        learning.parse_args(["--variant", "persona:nobody"])
    assert e.value.code == 2
    assert "unknown persona 'nobody'" in capsys.readouterr().err


def test_defaults_of_the_cli():
    args, variants = learning.parse_args([])
    assert (args.runs, args.out, args.minutes, args.max_events) == (5, Path("runs/learning"), 20.0, 3000)
    assert (args.events_per_s, args.target, args.seed, args.quiet) == (4.0, 0.8, 0, False)
    assert [v.name for v in variants] == ["default"]


def test_runs_are_interleaved_and_seeded_from_the_first_seed():
    vs = learning.parse_variants(["default", "only:pair"], 0.8)
    got = [(i, v.name, s) for i, v, s in learning.plan(vs, 2, 10)]
    assert got == [(0, "default", 10), (0, "only:pair", 10), (1, "default", 11), (1, "only:pair", 11)]


# -- personas ---------------------------------------------------------------------------------


def test_inverted_negates_every_weight_and_keeps_the_rest():
    for p in DEFAULT_PERSONAS:
        inv = p.inverted()
        assert inv.name == f"{p.name}-inverted"
        assert inv.weights == {k: -w for k, w in p.weights.items()}
        assert (inv.noise, inv.careless, inv.share) == (p.noise, p.careless, p.share)
        assert inv.thumbs_bar == -p.thumbs_bar  # thumbs up for what the original turns down
        assert p.weights == persona_named(p.name).weights  # the original is untouched


def _answers() -> list[tuple[str, str]]:
    """Real corpus (prompt, answer) examples of every style."""
    return [(e.prompt, e.answer) for e in corpus.generate(60, seed=3)]


def _garbled(answer: str) -> str:
    """The same answer with one invented word: every style feature unchanged, but malformed."""
    words = answer.split()
    return " ".join([*words[:1], "blorptastic", *words[1:]])


def test_garbled_text_still_costs_an_inverted_persona():
    for prompt, answer in _answers():
        assert panel.well_formed(answer) and not panel.well_formed(_garbled(answer))
        for p in DEFAULT_PERSONAS:
            for who in (p, p.inverted()):
                assert panel.utility(who, prompt, _garbled(answer)) < panel.utility(who, prompt, answer)


def test_inverted_persona_prefers_what_the_original_dislikes():
    p = persona_named("customer")
    prompt = corpus.TOPICS["order"][1][0]
    body = corpus.TOPICS["order"][2][0]
    nice = f"{corpus.POLITE[0]} {body} {corpus.CLOSINGS[0]}"
    rude = f"{corpus.RUDE[0]} {corpus.TOPICS['bread'][2][0]} {corpus.FILLERS[0]} {corpus.FILLERS[1]}"
    assert panel.utility(p, prompt, nice) > panel.utility(p, prompt, rude)
    assert panel.utility(p.inverted(), prompt, nice) < panel.utility(p.inverted(), prompt, rude)


def test_persona_named():
    assert persona_named("stickler") is DEFAULT_PERSONAS[3]
    with pytest.raises(ValueError) as e:
        persona_named("nobody")
    assert str(e.value) == "unknown persona 'nobody': choose one of customer, engineer, chatter, stickler"


def test_persona_is_still_a_frozen_dataclass():
    assert isinstance(DEFAULT_PERSONAS[0].inverted(), Persona)
    with pytest.raises(AttributeError):
        DEFAULT_PERSONAS[0].inverted().name = "x"  # type: ignore[misc]


# -- verdicts and tables ----------------------------------------------------------------------


def report(**over: Any) -> dict[str, Any]:
    """A run's report as run_demo writes it (the keys the bench reads), passing by default."""
    r: dict[str, Any] = {
        "win_rate_vs_starter": 0.84,
        "win_rate_se": 0.026,
        "win_rate_n": 200,
        "feedback_events": 1800,
        "minutes": 7.5,
        "kl_to_starter": 2.4,
        "kl_budget": 6.0,
        "answers": {"well_formed": 0.96, "mean_words": 30.0},
        "starter_answers": {"well_formed": 0.98, "mean_words": 40.0},
        "hidden_utility": {"serving": 3.1, "starter": 1.2},
        "policy_versions_promoted": [3, 7, 12],
        "series": [{"t_s": 30.0, "win_rate": 0.5}, {"t_s": 60.0, "win_rate": 0.7}],
        "settings": {"FLYWHEEL_TRAINER_ALGO": "rloo"},
    }
    for k, v in over.items():
        if isinstance(v, dict):
            r[k] = {**r[k], **v}
        else:
            r[k] = v
    return r


def test_a_report_within_every_limit_passes():
    assert learning.verdict(report(), 0.8, LIMITS) == []
    # on the boundaries too
    edge = report(win_rate_vs_starter=0.8, feedback_events=3000, minutes=20.0, kl_to_starter=3.0)
    assert learning.verdict(edge, 0.8, LIMITS) == []


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"win_rate_vs_starter": 0.79}, "win-rate 0.790 < 0.8"),
        ({"win_rate_vs_starter": float("nan")}, "win-rate nan < 0.8"),
        ({"feedback_events": 3001}, "events 3001 > 3000"),
        ({"minutes": 20.4}, "minutes 20.4 > 20"),
        ({"answers": {"well_formed": 0.9}}, "well-formed 0.92x starter < 0.95x"),
        ({"kl_to_starter": 3.2}, "KL 3.20 > 3 (0.5 of the gate budget 6)"),
        ({"kl_to_starter": float("nan")}, "KL nan > 3"),
    ],
)
def test_each_limit_fails_a_run_alone(over, reason):
    reasons = learning.verdict(report(**over), 0.8, LIMITS)
    assert len(reasons) == 1 and reasons[0].startswith(reason), reasons


def test_every_failing_reason_is_listed():
    r = report(win_rate_vs_starter=0.6, feedback_events=4000, minutes=21, answers={"well_formed": 0.1}, kl_to_starter=9)
    assert [x.split()[0] for x in learning.verdict(r, 0.8, LIMITS)] == [
        "win-rate",
        "events",
        "minutes",
        "well-formed",
        "KL",
    ]


def test_the_variant_target_is_the_bar():
    assert learning.verdict(report(win_rate_vs_starter=0.72), 0.7, LIMITS) == []
    assert learning.verdict(report(win_rate_vs_starter=0.72), 0.8, LIMITS) != []


def test_well_formed_ratio_is_against_the_same_runs_starter():
    assert learning.well_formed_ratio(report()) == pytest.approx(0.96 / 0.98)
    assert learning.well_formed_ratio(report(starter_answers={"well_formed": 0.0})) == float("inf")
    assert learning.well_formed_ratio(report(answers={"well_formed": 0.0}, starter_answers={"well_formed": 0.0})) == 1


def test_run_row_and_line():
    [v] = learning.parse_variant("persona:engineer:inverted", 0.8)
    row = learning.run_row(v, 3, report(), LIMITS)
    assert row["variant"] == "persona:engineer:inverted" and row["seed"] == 3 and row["target"] == 0.7
    assert row["passed"] and row["reasons"] == [] and row["promoted"] == 3
    line = learning.run_line(row)
    assert line.startswith("persona:engineer:inverted seed 3: win-rate 0.840±0.026 (target 0.7), 1800 events")
    assert "KL 2.40 (gate budget 6)" in line and "well-formed 0.96 vs starter 0.98 (0.98x)" in line
    assert line.endswith("3 versions promoted: PASS")
    stopped = learning.run_row(v, 3, report(), LIMITS, interrupted=True)
    assert not stopped["passed"] and stopped["reasons"] == ["interrupted"]


def _rows() -> list[dict[str, Any]]:
    [d] = learning.parse_variant("default", 0.8)
    [p] = learning.parse_variant("only:pair", 0.8)
    return [
        learning.run_row(d, 0, report(win_rate_vs_starter=0.84, minutes=7.0), LIMITS),
        learning.run_row(p, 0, report(win_rate_vs_starter=0.75, minutes=9.0), LIMITS),
        learning.run_row(d, 1, report(win_rate_vs_starter=0.78, minutes=20.5), LIMITS),
        learning.run_row(d, 2, report(win_rate_vs_starter=0.82, minutes=5.0), LIMITS),
    ]


def test_summary_per_variant():
    s = learning.summarize(_rows())
    assert [x["variant"] for x in s] == ["default", "only:pair"]
    assert (s[0]["runs"], s[0]["passed"], s[0]["median_minutes"]) == (3, 2, 7.0)
    assert (s[0]["median_win_rate"], s[0]["worst_win_rate"], s[0]["target"]) == (0.82, 0.78, 0.8)
    assert (s[1]["runs"], s[1]["passed"], s[1]["target"]) == (1, 1, 0.7)
    assert learning.summarize([]) == []
    lines = learning.summary_lines(s)
    assert lines[0].split()[:2] == ["variant", "passed"] and "2/3" in lines[1]


def test_markdown_table_has_one_row_per_run():
    rows = _rows()
    md = learning.markdown(rows, learning.summarize(rows), caption="Four runs.")
    lines = md.splitlines()
    assert lines[0] == "Four runs."
    head = "| variant | seed | win-rate | events | minutes | KL / budget | well-formed vs starter | verdict |"
    i = lines.index(head)
    table = lines[i + 2 : i + 2 + len(rows)]
    assert all(line.count("|") == 9 for line in lines[i : i + 2 + len(rows)])
    assert table[0] == "| default | 0 | 0.840 ± 0.026 | 1800 | 7.0 | 2.40 / 6 | 0.96 vs 0.98 (0.98x) | PASS |"
    assert table[1].endswith("| FAIL: win-rate 0.780 < 0.8; minutes 20.5 > 20 |")
    assert [line.split(" | ")[:2] for line in table] == [
        ["| default", "0"],
        ["| default", "1"],
        ["| default", "2"],
        ["| only:pair", "0"],
    ]
    assert lines[i + 2 + len(rows)] == ""  # then the summary table
    assert "| default | 2/3 | 7.0 | 0.820 | 0.780 | 0.8 |" in lines


def test_outputs_are_written(tmp_path):
    rows = _rows()
    args, variants = learning.parse_args(["--runs", "3", "--out", str(tmp_path)])
    sweep = learning.Sweep(tmp_path, learning.settings_of(args, variants, LIMITS))
    for row in rows:
        sweep.add(row, report())
    sweep.stopped = "interrupted after 4 of 5 runs"
    result = sweep.write()
    assert result["settings"]["seeds"] == [0, 1, 2] and result["settings"]["demo_settings"]
    assert len(result["rows"]) == 4 and result["stopped"] == "interrupted after 4 of 5 runs"
    assert (tmp_path / "learning.json").exists() and (tmp_path / "learning.png").stat().st_size > 0
    assert "Stopped early: interrupted after 4 of 5 runs." in (tmp_path / "learning.md").read_text()


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as e:
        learning.parse_args(["--help"])
    assert e.value.code == 0
    assert "persona:NAME:inverted" in capsys.readouterr().out


# -- the runner, with run_demo faked -----------------------------------------------------------


def test_main_runs_every_variant_and_seed_and_writes_the_results(tmp_path, monkeypatch):
    from flywheel.loop import demo

    seen: list[Any] = []

    def fake_run_demo(cfg: Any, stop: Any) -> dict[str, Any]:
        seen.append(cfg)
        return report(win_rate_vs_starter=0.9 if cfg.mix is None else 0.75)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "broker:9092")
    code = learning.main(["--runs", "2", "--seed", "5", "--out", str(tmp_path), "--variant", "only:thumbs", "--quiet"])
    assert code == 0
    assert [(c.out, c.seed, c.mix, c.target_win_rate) for c in seen] == [
        (tmp_path / "only-thumbs" / "run-0", 5, {"thumbs": 1.0}, 0.7),
        (tmp_path / "only-thumbs" / "run-1", 6, {"thumbs": 1.0}, 0.7),
    ]
    c = seen[0]
    assert (c.minutes, c.max_events, c.events_per_s, c.progress, c.bootstrap) == (20.0, 3000, 4.0, False, "broker:9092")
    assert c.personas == DEFAULT_PERSONAS and c.env == {}  # the defaults are what is measured
    md = (tmp_path / "learning.md").read_text()
    assert "| only:thumbs | 5 | 0.750" in md and "| only:thumbs | 6 | 0.750" in md and "| only:thumbs | 2/2 |" in md


def test_main_fails_a_failing_run_and_stops_cleanly_when_a_service_dies(tmp_path, monkeypatch, capsys):
    from flywheel.loop import demo
    from flywheel.loop.supervisor import ChildDied

    calls = []

    def fake_run_demo(cfg: Any, stop: Any) -> dict[str, Any]:
        calls.append(cfg)
        if len(calls) == 2:
            raise ChildDied("trainer", 1, tmp_path / "trainer.log")
        return report(win_rate_vs_starter=0.5)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert learning.main(["--runs", "3", "--out", str(tmp_path), "--quiet"]) == 3
    assert len(calls) == 2
    import json

    result = json.loads((tmp_path / "learning.json").read_text())
    assert len(result["rows"]) == 1 and not result["rows"][0]["passed"]
    assert result["stopped"].startswith("service trainer exited with code 1")
    assert "stopped early: service trainer exited" in capsys.readouterr().out


def test_main_ends_after_the_run_a_signal_interrupted(tmp_path, monkeypatch):
    from flywheel.loop import demo

    calls = []

    def fake_run_demo(cfg: Any, stop: Any) -> dict[str, Any]:
        calls.append(cfg)
        stop.set()  # what SIGINT does: run_demo ends early with its final evaluation
        return report()

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert learning.main(["--runs", "3", "--out", str(tmp_path), "--quiet"]) == 3
    assert len(calls) == 1
    md = (tmp_path / "learning.md").read_text()
    assert "FAIL: interrupted" in md and "Stopped early: interrupted after 1 of 3 runs." in md


def test_set_variant_is_the_default_panel_with_settings_changed() -> None:
    [v] = learning.parse_variants(["set:FLYWHEEL_TRAINER_PTX_COEF=0.1,FLYWHEEL_TRAINER_GATE_KL_BUDGET=4"], 0.8)
    assert v.personas == DEFAULT_PERSONAS and v.mix is None and v.target == 0.8
    assert dict(v.env) == {"FLYWHEEL_TRAINER_PTX_COEF": "0.1", "FLYWHEEL_TRAINER_GATE_KL_BUDGET": "4"}
    assert v.slug == "set-FLYWHEEL_TRAINER_PTX_COEF-0.1+FLYWHEEL_TRAINER_GATE_KL_BUDGET-4"
    for bad in ("set:", "set:LR=1", "set:FLYWHEEL_X", "set:FLYWHEEL_X="):
        with pytest.raises(ValueError, match="use set:FLYWHEEL_NAME=VALUE"):
            learning.parse_variants([bad], 0.8)
