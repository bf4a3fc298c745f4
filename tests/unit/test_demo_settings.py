"""The demo runs the shipped defaults: what it sets differently says why, and is not about learning."""

from __future__ import annotations

import re

from flywheel.core.config import env_vars
from flywheel.loop import demo
from flywheel.reward.config import JoinConfig, TrainConfig
from flywheel.trainer.config import TrainerConfig

# Settings that decide how the loop learns: the demo must not change them, so that what it shows
# is what an install with the defaults does.
LEARNING = {
    var.name
    for cls in (TrainerConfig, TrainConfig, JoinConfig)
    for field, var in env_vars(cls).items()
    if field not in {"prompt_source", "prompt_pool", "consumer_group", "group", "state_dir", "device", "reward_addr"}
}


def test_every_demo_override_says_why_it_is_about_the_demo() -> None:
    for name, (value, why) in demo.DEMO_SETTINGS.items():
        assert re.fullmatch(r"FLYWHEEL_[A-Z0-9_]+", name), name
        assert value and len(why.split()) >= 8, f"{name}: say why the demo sets it ({why!r})"
    assert demo.DEMO_ENV == {n: v for n, (v, _) in demo.DEMO_SETTINGS.items()}


def test_the_demo_overrides_no_learning_setting() -> None:
    assert not set(demo.DEMO_ENV) & LEARNING, sorted(set(demo.DEMO_ENV) & LEARNING)
    assert "FLYWHEEL_TRAINER_LR" in LEARNING and "FLYWHEEL_REWARD_TRAIN_LR" in LEARNING  # the check sees them


def test_the_demo_config_has_no_training_knobs() -> None:
    """DemoConfig is about the panel, the evaluation and the stop rule; nothing trains differently."""
    fields = set(demo.DemoConfig.__dataclass_fields__)
    assert not {f for f in fields if f.startswith(("resume_", "kl_", "lr", "gate_"))}, fields


def test_demo_adapter_lora_trains_adapter_versions_and_nothing_else_changes() -> None:
    """`flywheel demo --adapter lora`: the one setting it changes is the trainer's adapter."""
    from flywheel.loop.__main__ import build_parser

    args = build_parser().parse_args(["demo", "--adapter", "lora"])
    assert demo.demo_config(args).env == {"FLYWHEEL_TRAINER_ADAPTER": "lora"}
    assert demo.demo_config(build_parser().parse_args(["demo"])).env == {}
