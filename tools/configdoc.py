"""Render every config dataclass as the Markdown reference in docs/CONFIG.md.

    python -m tools.configdoc           # rewrite docs/CONFIG.md
    python -m tools.configdoc --check   # exit 1 if docs/CONFIG.md is stale

The dataclasses are the only source of settings, help text and environment variables (named
by `flywheel.core.config.env_name`), and `OTHER_VARIABLES` of the rest the code reads; this
keeps the operator's reference from drifting away from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

from flywheel.core.config import OTHER_VARIABLES, ConfigSection, env_vars
from tools.protogen import ROOT

DOC = ROOT / "docs" / "CONFIG.md"

# (section title, "module:Class") in the order an operator meets them.
CLASSES: list[tuple[str, str]] = [
    ("Kafka", "flywheel.core.config:KafkaConfig"),
    ("Topics", "flywheel.core.config:TopicsConfig"),
    ("Model store", "flywheel.core.modelstore:ModelStoreConfig"),
    ("Auth", "flywheel.core.auth:AuthConfig"),
    ("gRPC and HTTP server (every service)", "flywheel.core.server:ServerConfig"),
    ("Logs (every service)", "flywheel.core.logs:LogConfig"),
    ("Tracing (every service)", "flywheel.core.tracing:TracingConfig"),
    ("TLS (every gRPC and HTTP server, every client)", "flywheel.core.tls:TlsConfig"),
    ("Request limits (policy and feedback)", "flywheel.core.limits:LimitsConfig"),
    ("Policy engine", "flywheel.policy.config:EngineConfig"),
    ("Policy service", "flywheel.policy.service:PolicyConfig"),
    ("Feedback", "flywheel.feedback.config:FeedbackConfig"),
    ("Reward: preference join", "flywheel.reward.config:JoinConfig"),
    ("Reward: model", "flywheel.reward.config:RewardModelConfig"),
    ("Reward: online training", "flywheel.reward.config:TrainConfig"),
    ("Reward: scoring", "flywheel.reward.config:ScoreConfig"),
    ("Trainer (PPO)", "flywheel.trainer.config:TrainerConfig"),
    ("Trainer: leader election", "flywheel.ops.lease:LeaseConfig"),
]


def config_classes() -> list[tuple[str, type[ConfigSection]]]:
    """(title, class) of every documented config dataclass."""
    out = []
    for title, path in CLASSES:
        module, name = path.split(":")
        out.append((title, getattr(importlib.import_module(module), name)))
    return out


def _default(f: dataclasses.Field[object]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    text = repr(value)
    if "/root/" in text or "/home/" in text:  # a path under the generating user's home
        text = text.replace(str(Path.home()), "~")
    return f"`{text}`"


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m tools.configdoc`; a test fails when",
        "it is stale. Precedence: field default < YAML file (`FLYWHEEL_CONFIG`) < environment variable",
        "< command-line flag. A wrong value stops the service at start with the field and the fix.",
        "",
        "Each section below is a section of the YAML file, and every field's environment variable is",
        "`FLYWHEEL_<SECTION>_<FIELD>` in upper case (`kafka.max_attempts`: `FLYWHEEL_KAFKA_MAX_ATTEMPTS`).",
        "A variable named before this rule still works as a deprecated alias, read only when the new",
        "one is unset (a warning says so); it is listed under the new name.",
    ]
    for title, cls in config_classes():
        vars_ = env_vars(cls)
        out += [
            "",
            f"## {title} (`{cls.__name__}`, section `{cls.SECTION}`)",
            "",
            "| field | env | default | meaning |",
            "|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            var = vars_[f.name]
            env = f"`{var.name}`" + (f" (deprecated: `{var.deprecated_alias}`)" if var.deprecated_alias else "")
            help_text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
            out.append(f"| `{f.name}` | {env} | {_default(f)} | {help_text} |")
    out += [
        "",
        "## Other variables",
        "",
        "Not settings of a section: read before the config, passed between processes, or for tools and tests.",
        "",
        "| variable | meaning |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {meaning} |" for name, meaning in OTHER_VARIABLES.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether docs/CONFIG.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/CONFIG.md is stale: run `python -m tools.configdoc`")
            return 1
        print("docs/CONFIG.md is fresh")
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
