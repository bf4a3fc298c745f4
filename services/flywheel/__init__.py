"""Flywheel: online RLHF. Serve a policy, learn a reward from live feedback, improve the policy
with PPO, and hot-swap it while serving. See docs/ARCHITECTURE.md."""

__version__ = "0.1.0"
