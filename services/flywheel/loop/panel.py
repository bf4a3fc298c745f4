"""Simulated users: personas with hidden preferences over the starter corpus' answer styles.

They use only the public APIs, through the application client `flywheel.client` (Policy.Generate
/ GeneratePair, Feedback.Submit with the feedback_token each answer came with) and give thumbs, 1-3 ratings, pairwise choices and
now and then a demonstration. What they like is hidden from the system: each persona scores
an answer with a weighted sum of the features `corpus.classify` reads back from the text
(tone, length, topic, closing), plus a penalty for malformed text. Personas disagree (one
likes chatty answers, one hates sign-offs), judge with logistic noise and sometimes click at
random, so the reward model has to learn a consensus from noisy, conflicting labels.

The panel's *hidden utility* (the persona utilities averaged by how often each persona
shows up, no noise) is what the demo's win-rate uses: never the reward model's score.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flywheel.policy import corpus

if TYPE_CHECKING:  # grpc loads only where the panel talks to services
    from flywheel.client import Answer, Client, Receipt

FEATURES = ("polite", "rude", "concise", "on_topic", "closing")


@dataclasses.dataclass(frozen=True)
class Persona:
    """A kind of user: feature weights (hidden), how noisy and careless, how often it shows up."""

    name: str
    weights: dict[str, float]
    noise: float = 0.5  # logistic temperature of every judgment (0: deterministic)
    careless: float = 0.05  # share of judgments made at random
    share: float = 1.0  # relative frequency among the panel's users
    thumbs_bar: float = 1.0  # utility above which a thumbs-up is likely

    def inverted(self) -> Persona:
        """The opposite taste: every weight negated (`utility`'s malformed penalty is no weight: it stays)."""
        return dataclasses.replace(
            self,
            name=f"{self.name}-inverted",
            weights={k: -w if w else 0.0 for k, w in self.weights.items()},
            thumbs_bar=-self.thumbs_bar,  # thumbs up for what the original turns down
        )


DEFAULT_PERSONAS: tuple[Persona, ...] = (
    Persona("customer", {"polite": 1.0, "rude": -2.0, "concise": 1.0, "on_topic": 2.0, "closing": 0.5}, share=0.4),
    Persona("engineer", {"polite": 0.2, "rude": -1.0, "concise": 2.0, "on_topic": 2.0, "closing": -0.5}, share=0.25),
    Persona("chatter", {"polite": 1.5, "rude": -2.5, "concise": -0.3, "on_topic": 1.0, "closing": 1.0}, 0.8, share=0.2),
    Persona("stickler", {"polite": 0.5, "rude": -1.0, "concise": 0.5, "on_topic": 3.0, "closing": 0.0}, share=0.15),
)


def persona_named(name: str) -> Persona:
    """The persona of DEFAULT_PERSONAS called `name` (ValueError naming the choices if there is none)."""
    for p in DEFAULT_PERSONAS:
        if p.name == name:
            return p
    raise ValueError(f"unknown persona {name!r}: choose one of {', '.join(p.name for p in DEFAULT_PERSONAS)}")


_PHRASES = sorted(
    {
        p.lower()
        for p in (
            *corpus.POLITE,
            *corpus.RUDE,
            *corpus.FILLERS,
            *corpus.CLOSINGS,
            *(b for t in corpus.TOPICS.values() for b in t[2]),
        )
    },
    key=len,
    reverse=True,
)


def well_formed(answer: str) -> bool:
    """True when the answer is made of whole sentences of the corpus (no garbled or invented text)."""
    text = " ".join(answer.lower().split())
    for phrase in _PHRASES:
        text = text.replace(phrase, " ")
    return not text.strip()


def features(prompt: str, answer: str) -> dict[str, float]:
    """0/1 style features of an answer, plus `malformed` (empty, garbled, too long or repeating itself)."""
    s = corpus.classify(prompt, answer)
    sentences = [x.strip() for x in answer.replace("!", ".").replace("?", ".").split(".") if x.strip()]
    repeats = len(sentences) - len(set(sentences))
    return {
        "polite": float(s.tone == "polite"),
        "rude": float(s.tone == "rude"),
        "concise": float(not s.verbose),
        "on_topic": float(bool(s.on_topic)),
        "closing": float(s.closing),
        "malformed": float(s.words < 4 or repeats > 0 or s.words > 90 or not well_formed(answer)),
    }


def utility(persona: Persona, prompt: str, answer: str) -> float:
    """What `persona` thinks of `answer` (noise-free); malformed text costs everyone dearly."""
    f = features(prompt, answer)
    return sum(w * f[k] for k, w in persona.weights.items()) - 3.0 * f["malformed"]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


class Panel:
    """The personas, their hidden utility and their noisy judgments (no I/O: testable alone)."""

    def __init__(self, personas: Sequence[Persona] = DEFAULT_PERSONAS, seed: int = 0) -> None:
        self.personas = list(personas)
        total = sum(p.share for p in self.personas)
        self.shares = [p.share / total for p in self.personas]
        self.rng = random.Random(seed)

    def pick(self) -> Persona:
        return self.rng.choices(self.personas, weights=self.shares)[0]

    def hidden_utility(self, prompt: str, answer: str) -> float:
        """The panel's consensus: persona utilities averaged by share (the win-rate's judge)."""
        return sum(s * utility(p, prompt, answer) for p, s in zip(self.personas, self.shares, strict=True))

    def _noisy(self, p: Persona, x: float) -> bool:
        """A yes/no judgment: P(yes) = sigmoid(x / noise); careless users flip a coin."""
        if self.rng.random() < p.careless:
            return self.rng.random() < 0.5
        if p.noise <= 0:
            return x > 0
        return self.rng.random() < _sigmoid(x / p.noise)

    def thumbs(self, p: Persona, prompt: str, answer: str) -> int:
        return 1 if self._noisy(p, utility(p, prompt, answer) - p.thumbs_bar) else -1

    def rating(self, p: Persona, prompt: str, answer: str, scale: int = 3) -> int:
        """1..scale: thresholds spread around the thumbs bar, each crossed with noise."""
        u = utility(p, prompt, answer)
        steps = [p.thumbs_bar + 1.5 * (i - (scale - 2) / 2) for i in range(scale - 1)]
        return 1 + sum(self._noisy(p, u - t) for t in steps)

    def prefer(self, p: Persona, prompt: str, a: str, b: str, tie_band: float = 0.2) -> str:
        """ "A", "B" or "TIE" (a tie when the two are about equally good to this persona)."""
        d = utility(p, prompt, a) - utility(p, prompt, b)
        if abs(d) < tie_band and self.rng.random() >= p.careless:
            return "TIE"
        return "A" if self._noisy(p, d) else "B"

    def demonstration(self, p: Persona, prompt: str) -> str:
        """The answer this persona would have wanted, written from the corpus' phrases."""
        topic = corpus.topic_of(prompt) or self.rng.choice(list(corpus.TOPICS))
        w = p.weights
        parts = [self.rng.choice(corpus.POLITE)] if w.get("polite", 0) > 0 else []
        if w.get("rude", 0) > 0:
            parts = [self.rng.choice(corpus.RUDE)]
        if w.get("on_topic", 0) < 0:  # a persona that wants answers about something else
            topic = self.rng.choice([t for t in corpus.TOPICS if t != topic])
        parts.append(self.rng.choice(corpus.TOPICS[topic][2]))
        if w.get("concise", 0) < 0:
            parts.append(self.rng.choice(corpus.FILLERS))
        if w.get("closing", 0) > 0:
            parts.append(self.rng.choice(corpus.CLOSINGS))
        return " ".join(parts)

    def win_rate(self, prompt_answers: Sequence[tuple[str, str]], starter_bank: dict[str, list[str]]) -> float:
        """Share of (prompt, serving answer) that beat the starter's answers to the same prompt, ties half.

        Each serving answer is compared with every banked starter answer for its prompt (the
        exact expected win-rate against a fresh starter sample, with less noise than one draw).
        """
        scores = []
        for prompt, answer in prompt_answers:
            u = self.hidden_utility(prompt, answer)
            others = [self.hidden_utility(prompt, s) for s in starter_bank[prompt]]
            scores.append(sum(1.0 if u > o else 0.5 if u == o else 0.0 for o in others) / len(others))
        return sum(scores) / len(scores) if scores else float("nan")


@dataclasses.dataclass
class PanelConfig:
    """How the simulated users behave as clients."""

    prompts: list[str] = dataclasses.field(default_factory=corpus.prompts)
    events_per_s: float = 4.0  # feedback events per second, all users together
    max_events: int = 3000  # stop giving feedback after this many
    workers: int = 4  # concurrent users
    mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"pair": 0.5, "thumbs": 0.25, "rating": 0.2, "demonstration": 0.05}
    )
    max_new_tokens: int = 96
    temperature: float = 1.0
    seed: int = 0


class PanelClient:
    """The panel talking to running services through `flywheel.client.Client`, as any application
    would; `run(stop)` gives feedback until stopped."""

    def __init__(self, panel: Panel, cfg: PanelConfig, client: Client) -> None:
        """`client`: a Client of the policy and feedback services (closed by `close()`)."""
        self.panel, self.cfg, self.client = panel, cfg, client
        self.events = 0
        self.errors: list[str] = []
        self.by_kind: dict[str, int] = {}
        self._lock = threading.Lock()
        self._next_at = time.monotonic()
        self._turns = 0  # turns handed out by _wait_turn (a failed call gives its turn back)

    @classmethod
    def connect(cls, panel: Panel, cfg: PanelConfig, policy_addr: str, feedback_addr: str) -> PanelClient:
        """A client of the running services at these gRPC addresses (TLS as the `tls` section says).
        No retries inside a call: a worker whose call failed records the error and tries again later
        (`_worker`), so the demo's error count shows every refusal."""
        from flywheel.client import NO_RETRY, Client
        from flywheel.core.tls import load_tls

        return cls(panel, cfg, Client(policy_addr, feedback_addr, tls=load_tls(), timeout_s=60, retry=NO_RETRY))

    def _sampling(self, seed: int | None) -> dict[str, Any]:
        s: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature}
        return s | {"do_sample": True} | ({} if seed is None else {"seed": seed})

    def generate(self, prompt: str, user: str = "panel-eval", seed: int | None = None) -> Answer:
        return self.client.generate(prompt, user, timeout_s=60, **self._sampling(seed))

    def _count(self, kind: str, receipt: Receipt) -> None:
        with self._lock:
            self.events += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def one(self, rng: random.Random) -> None:
        """One user, one prompt, one piece of feedback (the client sends the answer's id, token and user)."""
        p = self.panel.pick()
        user = f"{p.name}-{rng.randrange(1000)}"
        prompt = rng.choice(self.cfg.prompts)
        kind = rng.choices(list(self.cfg.mix), weights=list(self.cfg.mix.values()))[0]
        c = self.client
        if kind == "pair":
            pair = c.generate_pair(prompt, user, timeout_s=60, **self._sampling(None))
            choice = self.panel.prefer(p, prompt, pair.a.text, pair.b.text)
            self._count(kind, c.prefer(pair, choice, timeout_s=30))  # type: ignore[arg-type]
            return
        r = self.generate(prompt, user)
        if kind == "thumbs":
            self._count(kind, c.thumbs(r, self.panel.thumbs(p, prompt, r.text) > 0, timeout_s=30))
        elif kind == "rating":
            self._count(kind, c.rate(r, self.panel.rating(p, prompt, r.text), timeout_s=30))
        else:
            self._count(kind, c.demonstrate(r, self.panel.demonstration(p, prompt), timeout_s=30))

    def _wait_turn(self, stop: threading.Event) -> bool:
        """A shared pacer: events_per_s across all workers; False once stopped or the budget is spent."""
        with self._lock:
            if self._turns >= self.cfg.max_events:  # turns taken, not events done: never over the budget
                return False
            self._turns += 1
            at = max(self._next_at, time.monotonic())
            self._next_at = at + 1.0 / self.cfg.events_per_s
        return not stop.wait(max(0.0, at - time.monotonic()))

    def _worker(self, i: int, stop: threading.Event) -> None:
        from flywheel.client import FlywheelError

        rng = random.Random(self.cfg.seed * 1000 + i)
        while self._wait_turn(stop):
            try:
                self.one(rng)
            except FlywheelError as e:  # a user whose call failed tries again later; the error is kept
                with self._lock:
                    self.errors.append(f"{e.code.name}: {e.message}")
                    self._turns -= 1
                stop.wait(1.0)

    def start(self, stop: threading.Event) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._worker, args=(i, stop), name=f"panel-{i}", daemon=True)
            for i in range(self.cfg.workers)
        ]
        for t in threads:
            t.start()
        return threads

    def close(self) -> None:
        self.client.close()


def starter_bank(
    model_path: str, prompts: Sequence[str], per_prompt: int, max_new_tokens: int, temperature: float, seed: int = 0
) -> dict[str, list[str]]:
    """Answers of the starter (loaded locally with transformers) to each prompt: the win-rate's baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    bank: dict[str, list[str]] = {}
    with torch.no_grad():
        for prompt in prompts:
            enc = tok([prompt] * per_prompt, return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
            bank[prompt] = [
                tok.decode(row, skip_special_tokens=True).strip() for row in out[:, enc.input_ids.shape[1] :]
            ]
    return bank


def answer_stats(answers: Sequence[str], finish: Sequence[str] | None = None) -> dict[str, float]:
    """Length and repetition of answers, so that reward hacking by rambling or looping would show."""
    words = [a.split() for a in answers]
    n = max(1, len(words))
    distinct2 = []
    for w in words:
        bigrams = list(zip(w, w[1:], strict=False))
        distinct2.append(len(set(bigrams)) / len(bigrams) if bigrams else 1.0)
    out = {
        "mean_words": sum(len(w) for w in words) / n,
        "max_words": float(max((len(w) for w in words), default=0)),
        "distinct2": sum(distinct2) / n,
        "well_formed": sum(well_formed(a) for a in answers) / n,
    }
    if finish is not None:
        out["eos_rate"] = sum(f in ("eos_token", "stop_sequence") for f in finish) / max(1, len(finish))
    return out
