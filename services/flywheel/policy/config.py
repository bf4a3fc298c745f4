"""Configuration of the policy serving engine (one dataclass per concern, as in vLLM)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from flywheel.core.config import require, setting

SWAP_POLICIES = ("finish_on_old", "reprefill")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class EngineConfig:
    """How the continuous-batching engine loads its model and how much work it accepts."""

    SECTION: ClassVar[str] = "policy_engine"

    model: str = setting(
        "",
        "Hugging Face model name or local path (from_pretrained). Empty: the starter policy from the model store.",
        alias="FLYWHEEL_POLICY_MODEL",
    )
    device: str = setting("auto", "auto (cuda when available), cpu, cuda or cuda:N.", alias="FLYWHEEL_POLICY_DEVICE")
    dtype: str = setting(
        "auto",
        "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16.",
        alias="FLYWHEEL_POLICY_DTYPE",
    )
    max_concurrent_sequences: int = setting(
        32, "Most sequences decoded together in one step (the running batch).", alias="FLYWHEEL_POLICY_MAX_CONCURRENT"
    )
    max_tokens_per_step: int = setting(
        2048,
        "Token budget of one scheduler step: prompt tokens prefilled plus one per decoding sequence "
        "(vLLM's max_num_batched_tokens).",
        alias="FLYWHEEL_POLICY_MAX_TOKENS_PER_STEP",
    )
    max_queue: int = setting(
        256,
        "Most requests waiting for a slot; more are refused with RESOURCE_EXHAUSTED.",
        alias="FLYWHEEL_POLICY_MAX_QUEUE",
    )
    max_input_tokens: int = setting(
        1024, "Longest prompt in tokens (also capped by the model's context).", alias="FLYWHEEL_POLICY_MAX_INPUT_TOKENS"
    )
    default_max_new_tokens: int = setting(
        64, "max_new_tokens of a request that does not set it.", alias="FLYWHEEL_POLICY_DEFAULT_MAX_NEW_TOKENS"
    )
    max_new_tokens_cap: int = setting(
        512, "Largest max_new_tokens a request may ask for.", alias="FLYWHEEL_POLICY_MAX_NEW_TOKENS_CAP"
    )
    swap_policy: str = setting(
        "finish_on_old",
        "On a hot swap, in-flight sequences finish on the weights they started with (finish_on_old: two copies "
        "until they leave, see mixed_drain) or restart from their prompt on the new weights (reprefill: they "
        "lose their tokens).",
        alias="FLYWHEEL_POLICY_SWAP_POLICY",
    )
    mixed_drain: bool = setting(
        True,
        "While in-flight sequences finish on the old weights, decode both versions' rows in one forward (each "
        "weighted module runs the old rows on the old weights), where the architecture was found at load to "
        "give one forward per version's logits that way (else, and when off: one forward per version a step).",
        alias="FLYWHEEL_POLICY_MIXED_DRAIN",
    )
    swap_drain_timeout_s: float = setting(
        120.0,
        "A new load waits at most this long for the sequences of the previous swap to leave (two copies at most).",
        alias="FLYWHEEL_POLICY_SWAP_DRAIN_TIMEOUT_S",
    )
    swap_nice: int = setting(
        10,
        "CPU niceness added to the swap worker's process, or to the threads that verify and load a new version "
        "(Linux; 0 = as the decode thread), so decode steps win the CPU while a swap loads. On a core the decode "
        "thread keeps busy, higher delays the swap more: with the service on one core, 5 cost the answers in "
        "flight at a switch 7-16 ms and 15 about nothing, but took ~0.2 s to announce a 0.5 MB version.",
        alias="FLYWHEEL_POLICY_SWAP_NICE",
    )
    swap_worker: bool = setting(
        True,
        "Consume the updates topic, verify and read new versions in a process of their own (Linux; its memory "
        "is handed over without a copy), so that their work never holds the decode thread's interpreter lock. "
        "Off: in threads of the service.",
        alias="FLYWHEEL_POLICY_SWAP_WORKER",
    )
    update_fetch_wait_ms: int = setting(
        50,
        "Longest a fetch of the updates topic waits on the broker when there is no new announcement "
        "(fetch_max_wait_ms). Apache Kafka answers a waiting fetch as soon as a record arrives; Tansu (the "
        "embedded broker) does not, so each swap started ~0.2 s late with the client's default of 500 ms.",
        alias="FLYWHEEL_POLICY_UPDATE_FETCH_WAIT_MS",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        dev = self.device.split(":")[0]
        require(dev in DEVICES, n, "device", self.device, "use auto, cpu, cuda or cuda:N")
        if ":" in self.device:
            require(dev == "cuda" and self.device.split(":", 1)[1].isdigit(), n, "device", self.device, "use cuda:N")
        require(self.dtype in DTYPES, n, "dtype", self.dtype, f"use one of {', '.join(DTYPES)}")
        for name in ("max_concurrent_sequences", "max_tokens_per_step", "max_queue", "max_input_tokens"):
            require(getattr(self, name) >= 1, n, name, getattr(self, name), "use 1 or more")
        require(
            self.max_input_tokens <= self.max_tokens_per_step,
            n,
            "max_input_tokens",
            self.max_input_tokens,
            f"a prompt must fit one step's token budget: lower it to at most max_tokens_per_step "
            f"({self.max_tokens_per_step}) or raise max_tokens_per_step",
        )
        require(
            self.max_concurrent_sequences <= self.max_tokens_per_step,
            n,
            "max_concurrent_sequences",
            self.max_concurrent_sequences,
            f"every running sequence needs one token of the step budget: lower it to at most "
            f"max_tokens_per_step ({self.max_tokens_per_step})",
        )
        require(
            1 <= self.max_new_tokens_cap <= 1 << 20,
            n,
            "max_new_tokens_cap",
            self.max_new_tokens_cap,
            "use 1 to 1048576 (the model's context bounds it further)",
        )
        require(
            1 <= self.default_max_new_tokens <= self.max_new_tokens_cap,
            n,
            "default_max_new_tokens",
            self.default_max_new_tokens,
            f"use a value from 1 to max_new_tokens_cap ({self.max_new_tokens_cap})",
        )
        require(
            self.swap_policy in SWAP_POLICIES,
            n,
            "swap_policy",
            self.swap_policy,
            f"use one of {', '.join(SWAP_POLICIES)}",
        )
        require(0 <= self.swap_nice <= 19, n, "swap_nice", self.swap_nice, "use 0 (off) to 19 (lowest priority)")
        require(
            10 <= self.update_fetch_wait_ms <= 5000,
            n,
            "update_fetch_wait_ms",
            self.update_fetch_wait_ms,
            "use 10 to 5000 (ms)",
        )
        require(
            self.swap_drain_timeout_s > 0, n, "swap_drain_timeout_s", self.swap_drain_timeout_s, "use a positive time"
        )
