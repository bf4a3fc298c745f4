"""The examples an application developer copies, run against real services (a policy with a tiny
model, the feedback service process, the real Kafka broker, API keys configured):

- examples/chat.py as a subprocess with piped stdin: its answers and versions are printed and its
  thumbs and rating arrive on the feedback topic;
- every Python block of docs/CLIENT.md and README.md marked `<!-- run by tests/integration/test_examples.py ... -->`
  (the client quick start, and the `openai` package reading the feedback token from a response,
  its headers and a stream's last chunk), with only its address and key lines replaced.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flywheel.v1 import events_pb2
from tests.integration.test_client import API_KEY, Stack, running_stack
from tests.integration.test_policy_service import one_torch_thread

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]
K = events_pb2
MARK = "<!-- run by tests/integration/test_examples.py"
_ = one_torch_thread  # the autouse fixture: one torch thread for the in-process policy


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(kafka_bootstrap, tmp_path_factory.mktemp("examples")) as s:
        yield s


def test_chat_example_serves_answers_and_sends_feedback(stack: Stack) -> None:
    typed = "how do I bake bread?\ny\nwhere is my order?\n2\nhi\n\n"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "chat.py"), "--user", "chatter", "--max-new-tokens", "8"]
        + ["--policy", stack.policy.grpc_addr, "--feedback", f"127.0.0.1:{stack.feedback.grpc_port}"],
        input=typed,
        capture_output=True,
        text=True,
        timeout=120,
        env={"FLYWHEEL_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("(policy v0)>") == 3, done.stdout
    assert done.stdout.count("feedback: accepted") == 2, done.stdout
    events = _events_of(stack, "app:chatter", 2)
    assert sorted((e.kind, e.value) for e in events) == [(K.FEEDBACK_KIND_THUMBS, 1), (K.FEEDBACK_KIND_RATING, 2)]
    assert all(e.policy_version == 0 for e in events)


def doc_blocks(doc: str = "docs/CLIENT.md", n: int = 2) -> list[str]:
    """The marked ```python blocks of `doc`, in order (CLIENT.md: the client quick start and the openai
    example; README.md: its application developers' snippet)."""
    text = (ROOT / doc).read_text()
    blocks = re.findall(re.escape(MARK) + r"[^\n]*\n```python\n(.*?)\n```", text, re.S)
    assert len(blocks) == n, f"{doc} should mark {n} python block(s) as run by this test"
    return blocks


def run_block(code: str, constants: dict[str, str]) -> dict[str, Any]:
    """Exec a documented block with its `NAME = ...` lines for these names replaced (each must exist)."""
    for name, value in constants.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.M)
        assert n == 1, f"the documented block has no line `{name} = ...` to point at the test's services"
    namespace: dict[str, Any] = {"__name__": "doc_example"}
    exec(compile(code, "a documented block", "exec"), namespace)  # noqa: S102 - the documentation is the test
    return namespace


def test_the_documented_client_quick_start(stack: Stack) -> None:
    quick_start, _ = doc_blocks()
    feedback = f"127.0.0.1:{stack.feedback.grpc_port}"
    ns = run_block(quick_start, {"POLICY": stack.policy.grpc_addr, "FEEDBACK": feedback, "API_KEY": API_KEY})
    assert ns["receipt"].status == "accepted" and ns["streamed"].interaction_id
    events = {(e.kind, e.interaction_id or e.pair_id) for e in _events_of(stack, "app:alice", 4)}
    assert {
        (K.FEEDBACK_KIND_THUMBS, ns["answer"].interaction_id),
        (K.FEEDBACK_KIND_RATING, ns["streamed"].interaction_id),
        (K.FEEDBACK_KIND_PREFERENCE, ns["pair"].pair_id),
        (K.FEEDBACK_KIND_DEMONSTRATION, ns["pair"].a.interaction_id),
    } <= events


def test_the_readme_snippet_for_application_developers(stack: Stack) -> None:
    (snippet,) = doc_blocks("README.md", 1)
    feedback = f"127.0.0.1:{stack.feedback.grpc_port}"
    ns = run_block(snippet, {"POLICY": stack.policy.grpc_addr, "FEEDBACK": feedback, "API_KEY": API_KEY, "USER": "bob"})
    events = {(e.kind, e.interaction_id or e.pair_id) for e in _events_of(stack, "app:bob", 2)}
    assert {
        (K.FEEDBACK_KIND_THUMBS, ns["answer"].interaction_id),
        (K.FEEDBACK_KIND_PREFERENCE, ns["pair"].pair_id),
    } <= events


def test_the_documented_openai_example_finds_the_feedback_token(stack: Stack, capsys: pytest.CaptureFixture) -> None:
    _, with_openai = doc_blocks()
    ns = run_block(
        with_openai,
        {
            "POLICY_HTTP": stack.policy.http,
            "FEEDBACK_HTTP": f"http://127.0.0.1:{stack.feedback.http_port}",
            "KEY": API_KEY,
        },
    )
    out = capsys.readouterr().out
    assert out.count("'status': 'accepted'") == 2, out
    answer, streamed = ns["answer"], ns["streamed"]
    assert answer["policy_version"] == streamed["policy_version"] == 0
    assert answer["interaction_id"] != streamed["interaction_id"]
    got = {(e.kind, e.interaction_id, e.value) for e in _events_of(stack, "app:alice", 6)}
    assert {
        (K.FEEDBACK_KIND_THUMBS, answer["interaction_id"], 1),
        (K.FEEDBACK_KIND_RATING, streamed["interaction_id"], 3),
    } <= got


def _events_of(stack: Stack, user: str, n: int) -> list[events_pb2.FeedbackEvent]:
    """The feedback events of `user`, once at least `n` arrived."""
    from flywheel.testing import wait_for
    from tests.integration import test_feedback_service as fs

    mine: list[events_pb2.FeedbackEvent] = []

    def arrived() -> bool:
        records = fs.read_topic(stack.bootstrap, stack.topics.feedback, 0, settle_s=1.0, timeout_s=5)
        mine[:] = [e for _, e, _ in records if e.user_id == user]
        return len(mine) >= n

    wait_for(arrived, 30, f"{n} feedback events of {user} on the topic", poll_s=0.2)
    return mine
