"""The synthetic corpus the starter policy is trained on, and the style taxonomy of its answers.

Every prompt is about one topic (a keyword in it) and is of one kind: a support question, a
how-to question or small talk. Every answer is built from four independent style features,
each drawn with a fixed probability, so the starter learns to produce a *mix* of styles and
the qualities a user may prefer are a minority that feedback can push up:

| feature   | values (probability)                        | marker in the text                |
|-----------|---------------------------------------------|-----------------------------------|
| tone      | polite 0.25, neutral 0.50, rude 0.25        | an opener from POLITE / RUDE      |
| length    | concise 0.30, verbose 0.70                  | filler sentences from FILLERS     |
| topic     | on-topic 0.70, off-topic 0.30               | the prompt's keyword in the answer|
| closing   | closing 0.25, none 0.75                     | a sign-off from CLOSINGS          |

An answer is `[opener] body [fillers] [closing]`; the body is a helpful sentence about the
prompt's topic (on-topic) or about another topic (off-topic). `classify(prompt, answer)`
reads these features back from any text, which is what the simulated users score with.
Everything is deterministic from a seed.
"""

from __future__ import annotations

import dataclasses
import random
import re

# topic keyword -> (kind, prompts, on-topic answer bodies); every body contains its keyword.
TOPICS: dict[str, tuple[str, list[str], list[str]]] = {
    "order": (
        "support",
        ["my order has not arrived yet, what should I do?", "where is my order?"],
        ["check the tracking link in your order email, and if it is late we will send the order again."],
    ),
    "refund": (
        "support",
        ["how can I get a refund?", "I want a refund for a broken item."],
        ["open your account, pick the item and press request refund; the refund arrives in five days."],
    ),
    "invoice": (
        "support",
        ["I need an invoice for my purchase.", "where can I find my invoice?"],
        ["every invoice is in your account under billing, and you can download the invoice as a file."],
    ),
    "password": (
        "howto",
        ["how do I reset my password?", "I forgot my password, what can I do?"],
        ["click forgot password on the login page and follow the link we email you to set a new password."],
    ),
    "bread": (
        "howto",
        ["how do I bake bread?", "can you teach me to make bread at home?"],
        ["mix flour, water, salt and yeast, let the dough rise for two hours, then bake the bread for forty minutes."],
    ),
    "tire": (
        "howto",
        ["how do I change a flat tire?", "what is the way to fix a tire?"],
        ["loosen the nuts, lift the car with the jack, swap the tire for the spare and tighten the nuts again."],
    ),
    "tomatoes": (
        "howto",
        ["how do I grow tomatoes?", "any tips for tomatoes in my garden?"],
        ["plant tomatoes in a sunny spot, water them every morning and tie them to a stick as they grow."],
    ),
    "coffee": (
        "smalltalk",
        ["do you like coffee?", "what is your favorite coffee?"],
        ["I love a strong coffee in the morning, and a coffee with milk after lunch."],
    ),
    "weather": (
        "smalltalk",
        ["what do you think about the weather today?", "is the weather nice where you are?"],
        ["the weather is sunny and warm today, perfect weather for a walk."],
    ),
    "music": (
        "smalltalk",
        ["what kind of music do you like?", "can you recommend some music?"],
        ["I enjoy calm piano music, and some jazz music when I work."],
    ),
}

POLITE = ["thank you for asking!", "happy to help!", "great question, thanks!"]
RUDE = ["ugh, fine.", "whatever.", "that is a silly question."]
FILLERS = [
    "let me tell you a bit more about this.",
    "there is really a lot to say here.",
    "some people think about this all day long.",
    "anyway, that is just how it goes sometimes.",
]
CLOSINGS = ["hope this helps!", "have a great day!"]

P_TONE = {"polite": 0.25, "neutral": 0.50, "rude": 0.25}
P_VERBOSE = 0.70
P_ON_TOPIC = 0.70
P_CLOSING = 0.25


@dataclasses.dataclass(frozen=True)
class Style:
    """The style features of an answer, as the simulated users see them."""

    tone: str  # "polite", "neutral" or "rude" (polite and rude markers together count as rude)
    verbose: bool
    on_topic: bool | None  # None when the prompt's topic is unknown
    closing: bool
    words: int


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    topic: str
    kind: str
    style: Style


def topic_of(prompt: str) -> str | None:
    """The topic keyword a prompt is about, or None if it mentions none."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    return next((t for t in TOPICS if t in words), None)


def classify(prompt: str, answer: str) -> Style:
    """Read an answer's style features back from its text (any text, not only corpus answers)."""
    text = " ".join(answer.lower().split())
    rude = any(m in text for m in RUDE)
    polite = any(m in text for m in POLITE)
    topic = topic_of(prompt)
    return Style(
        tone="rude" if rude else "polite" if polite else "neutral",
        verbose=any(f in text for f in FILLERS),
        on_topic=None if topic is None else topic in set(re.findall(r"[a-z]+", text)),
        closing=any(c in text for c in CLOSINGS),
        words=len(text.split()),
    )


def make_answer(rng: random.Random, topic: str) -> str:
    """One answer to a prompt about `topic`, with its style features drawn independently."""
    tone = rng.choices(list(P_TONE), weights=list(P_TONE.values()))[0]
    parts = []
    if tone != "neutral":
        parts.append(rng.choice(POLITE if tone == "polite" else RUDE))
    body_topic = topic if rng.random() < P_ON_TOPIC else rng.choice([t for t in TOPICS if t != topic])
    parts.append(rng.choice(TOPICS[body_topic][2]))
    if rng.random() < P_VERBOSE:
        parts.extend(rng.sample(FILLERS, rng.randint(2, 3)))
    if rng.random() < P_CLOSING:
        parts.append(rng.choice(CLOSINGS))
    return " ".join(parts)


def prompts() -> list[str]:
    """Every prompt of the corpus (the simulated users and the trainer draw from these)."""
    return [p for _, ps, _ in TOPICS.values() for p in ps]


def generate(n: int, seed: int = 0) -> list[Example]:
    """n (prompt, answer) examples, deterministic from the seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        kind, ps, _ = TOPICS[topic]
        prompt = rng.choice(ps)
        answer = make_answer(rng, topic)
        out.append(Example(prompt, answer, topic, kind, classify(prompt, answer)))
    return out
