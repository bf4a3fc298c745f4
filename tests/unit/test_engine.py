"""The continuous-batching engine: exactness under batching, sampling, limits, cancellation, hot swap."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import threading
import time
import weakref

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.core import errors
from flywheel.core.limits import LimitsConfig
from flywheel.policy import hotswap as hotswap_module
from flywheel.policy import reload as reload_module
from flywheel.policy.answers import AnswerFailed
from flywheel.policy.config import EngineConfig
from flywheel.policy.engine import Engine, GenerationRequest
from flywheel.policy.kvbatch import LoadedModel
from flywheel.policy.reload import reload_weights
from tests.unit.test_starter import tiny_starter

PROMPTS = [
    "how do I bake bread?",
    "where is my order?",
    "do you like coffee?",
    "I forgot my password, what can I do?",
    "hi",
    "can you recommend some music? I like many kinds of songs, old and new, loud and quiet.",
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def v0():
    return str(tiny_starter())


@pytest.fixture(scope="module")
def v1(v0, tmp_path_factory):
    """Version 1: version 0 with perturbed weights, so that greedy answers differ."""
    out = tmp_path_factory.mktemp("v1")
    model = AutoModelForCausalLM.from_pretrained(v0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(v0).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def v2(v0, tmp_path_factory):
    """Version 2: version 0's files with other weights only, as a trainer saves its next version."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("v2")
    shutil.copytree(v0, out, dirs_exist_ok=True)
    weights = load_file(out / "model.safetensors")
    torch.manual_seed(2)
    save_file(
        {k: t + torch.randn_like(t) * 0.3 for k, t in weights.items()}, out / "model.safetensors", {"format": "pt"}
    )
    return str(out)


@contextlib.contextmanager
def engine(path: str | None, version: int = 0, **kw):
    e = Engine(EngineConfig(device="cpu", **kw))
    e.start()
    if path:
        e.load_version(path, version)
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture
def slow(monkeypatch):
    """Make every forward take >= 5 ms so that requests overlap deterministically."""
    fwd = LoadedModel.forward

    def slow_forward(self, *a, **k):
        time.sleep(0.005)
        return fwd(self, *a, **k)

    monkeypatch.setattr(LoadedModel, "forward", slow_forward)


async def until(cond, what: str, timeout_s: float = 10.0) -> None:
    """Wait for `cond()` to hold, polling the engine from the event loop."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def greedy(prompt: str, n: int = 24, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, temperature=0.0, max_new_tokens=n, ignore_eos=True, **kw)


def ids(result) -> list[int]:
    return [t.id for t in result.tokens]


def test_batched_greedy_equals_single_with_requests_joining_mid_flight(v0):
    with engine(v0, max_concurrent_sequences=4, max_tokens_per_step=60, max_input_tokens=56) as e:
        alone = [asyncio.run(e.generate(greedy(p, 10 + 4 * i))) for i, p in enumerate(PROMPTS)]

        async def staggered():
            tasks = []
            for i, p in enumerate(PROMPTS):
                tasks.append(asyncio.create_task(e.generate(greedy(p, 10 + 4 * i))))
                await asyncio.sleep(0.01 * (i % 3))
            return await asyncio.gather(*tasks)

        together = asyncio.run(staggered())
    for a, b in zip(alone, together, strict=True):
        assert ids(a) == ids(b) and a.text == b.text
        assert b.finish_reason == "length" and b.generated_tokens == len(ids(b))
    # And the engine agrees with transformers' own greedy generate.
    tok = AutoTokenizer.from_pretrained(v0)
    model = AutoModelForCausalLM.from_pretrained(v0)
    enc = tok(PROMPTS[5], return_tensors="pt")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=30)[0, enc.input_ids.shape[1] :].tolist()
    assert len(ref) >= 5 and ref == ids(alone[5])[: len(ref)]  # HF stops at EOS, ignore_eos goes on


def test_seeded_sampling_is_reproducible_whatever_the_batch(v0):
    def req(seed):
        return GenerationRequest(prompt=PROMPTS[0], temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=30)

    with engine(v0) as e:
        alone = asyncio.run(e.generate(req(42)))

        async def crowd():
            others = [GenerationRequest(prompt=p, temperature=1.3, top_k=5, max_new_tokens=20) for p in PROMPTS]
            return await asyncio.gather(*[e.generate(r) for r in others[:3] + [req(42)] + others[3:]])

        results = asyncio.run(crowd())
        assert ids(results[3]) == ids(alone) and alone.seed == 42
        different = {tuple(ids(asyncio.run(e.generate(req(s))))) for s in range(6)}
        assert len(different) > 1


def test_finish_reasons_length_eos_and_stop_sequence(v0):
    with engine(v0) as e:
        r = asyncio.run(e.generate(greedy(PROMPTS[0], 3)))
        assert (r.finish_reason, r.generated_tokens) == ("length", 3)
        full = asyncio.run(e.generate(GenerationRequest(prompt=PROMPTS[1], temperature=0.0, max_new_tokens=100)))
        assert full.finish_reason == "eos_token"
        assert full.tokens[-1].special and full.tokens[-1].id in e.serving_model.eos_ids
        assert "</s>" not in full.text
        words = full.text.split()
        stop = " " + words[2]
        cut = asyncio.run(e.generate(GenerationRequest(prompt=PROMPTS[1], temperature=0.0, stop=["zzz", stop])))
        assert cut.finish_reason == "stop_sequence"
        assert cut.text == full.text[: full.text.index(stop)]

        async def streamed():
            chunks, final = [], None
            async for ev in e.stream(GenerationRequest(prompt=PROMPTS[1], temperature=0.0, stop=[stop])):
                chunks.append(ev.text)
                final = ev.result or final
            return "".join(chunks), final

        text, final = asyncio.run(streamed())
        assert text == cut.text == final.text and final.finish_reason == "stop_sequence"


def test_chat_messages_use_the_chat_template(v0):
    with engine(v0) as e:
        a = asyncio.run(e.generate(greedy(PROMPTS[2], 8)))
        b = asyncio.run(
            e.generate(
                GenerationRequest(
                    messages=[{"role": "user", "content": PROMPTS[2]}], temperature=0, max_new_tokens=8, ignore_eos=True
                )
            )
        )
        assert ids(a) == ids(b) and a.prompt_tokens == b.prompt_tokens
        assert a.prompt_text == PROMPTS[2] and PROMPTS[2] in b.prompt_text  # the rendered chat, for the log


def test_incremental_detokenization_gives_the_whole_decode(v0):
    """Streams decode a short window per token; the text must still be exactly decode(all ids),
    also through tokens that split a UTF-8 character (byte-level BPE) and special tokens."""
    import random

    from flywheel.policy.kvbatch import load_model
    from flywheel.policy.sequence import Sequence, detokenize

    m = load_model(v0, 0, EngineConfig(device="cpu"))
    assert m.incremental_detokenization
    rng = random.Random(0)
    vocab = len(m.tokenizer)
    for _ in range(50):
        seq = Sequence.__new__(Sequence)
        seq.generated, seq.text, seq.prefix_offset, seq.read_offset = [], "", 0, 0
        for _ in range(rng.randint(1, 40)):
            seq.generated.append(rng.randrange(vocab))
            detokenize(seq, m)
            assert m.decode(seq.generated).startswith(seq.text)
        detokenize(seq, m, final=True)
        assert seq.text == m.decode(seq.generated) == m.tokenizer.decode(seq.generated, skip_special_tokens=True)


def test_streamed_text_is_the_generated_text_when_sampling(v0):
    async def both(seed: int) -> tuple[str, str, str]:
        req = GenerationRequest(prompt=PROMPTS[seed % 6], temperature=1.5, seed=seed, max_new_tokens=32)
        parts = [ev.text async for ev in e.stream(req)]
        whole = await e.generate(req)
        return "".join(parts), whole.text, whole.tokens[-1].text

    with engine(v0) as e:
        for seed in range(8):
            streamed, whole, _ = asyncio.run(both(seed))
            assert streamed == whole


def test_logprobs_match_the_model_and_have_one_per_token(v0):
    with engine(v0) as e:
        r = asyncio.run(e.generate(greedy(PROMPTS[3], 12, logprobs=True)))
        plain = asyncio.run(e.generate(greedy(PROMPTS[3], 12)))
    assert len(r.tokens) == r.generated_tokens == 12
    assert all(t.logprob is not None and t.logprob <= 0 for t in r.tokens)
    assert all(t.logprob is None for t in plain.tokens)
    tok = AutoTokenizer.from_pretrained(v0)
    model = AutoModelForCausalLM.from_pretrained(v0)
    prompt = tok(PROMPTS[3])["input_ids"]
    seq = torch.tensor([prompt + ids(r)])
    with torch.no_grad():
        logp = model(seq).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    expected = logp.gather(-1, torch.tensor(ids(r))[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor([t.logprob for t in r.tokens]), expected, atol=1e-4)


@pytest.mark.parametrize(
    "req, message",
    [
        (GenerationRequest(prompt=""), "prompt is empty"),
        (GenerationRequest(prompt="   "), "prompt is empty"),
        (GenerationRequest(), "prompt is empty"),
        (GenerationRequest(messages=[]), "messages is empty"),
        (GenerationRequest(messages=[{"role": "bot", "content": "x"}]), "messages[0] must have a role"),
        (GenerationRequest(prompt="hi", messages=[{"role": "user", "content": "x"}]), "either prompt or messages"),
        (GenerationRequest(prompt="hi " * 40), "over the limit of 32 input tokens: shorten it"),
        (GenerationRequest(prompt="hi " * 12, max_new_tokens=245), "over the model's context of 256 tokens"),
        (GenerationRequest(prompt="hi", temperature=-0.5), "temperature = -0.5: use 0 (greedy) or a value from 0.01"),
        (GenerationRequest(prompt="hi", top_p=0.0), "top_p = 0.0: use a value in (0, 1]"),
        (GenerationRequest(prompt="hi", top_p=1.5), "top_p = 1.5: use a value in (0, 1]"),
        (GenerationRequest(prompt="hi", top_k=-1), "top_k = -1: use a value from 0 (off) to 1000000"),
        (GenerationRequest(prompt="hi", repetition_penalty=0.0), "repetition_penalty = 0.0: use a value from 0.01"),
        (GenerationRequest(prompt="hi", max_new_tokens=300), "max_new_tokens = 300 is over the limit of 250"),
        (GenerationRequest(prompt="hi", max_new_tokens=0), "ask for at least 1 token"),
        (GenerationRequest(prompt="hi", stop=[""]), "stop[0] is '': each stop sequence must be a non-empty string"),
        (GenerationRequest(prompt="hi", seed=-1), "seed = -1"),
    ],
)
def test_bad_requests_get_precise_invalid_argument(v0, req, message):
    with engine(v0, max_input_tokens=32, max_new_tokens_cap=250) as e:
        with pytest.raises(errors.InvalidArgument) as info:
            asyncio.run(e.generate(req))
    assert message in info.value.message


def test_not_loaded_is_unavailable():
    with engine(None) as e:
        with pytest.raises(errors.Unavailable, match="not loaded yet"):
            asyncio.run(e.generate(GenerationRequest(prompt="hi")))
        assert not e.info().ready


def test_queue_full_is_resource_exhausted(v0, slow):
    with engine(v0, max_concurrent_sequences=1, max_queue=2) as e:

        async def flood():
            long = [asyncio.create_task(e.generate(greedy(PROMPTS[0], 60)))]
            await until(lambda: e.info().running == 1, "it running: it left the queue")
            long += [asyncio.create_task(e.generate(greedy(p, 60))) for p in PROMPTS[1:3]]
            await until(lambda: e.info().waiting == 2, "two waiting")
            with pytest.raises(errors.ResourceExhausted, match="queue is full"):
                await e.generate(greedy(PROMPTS[3], 5))
            # Refused before any work on the request: neither validated nor tokenized.
            with pytest.raises(errors.ResourceExhausted, match="queue is full"):
                await e.generate(greedy("x" * 10_000_000, 10**9))
            with pytest.raises(errors.ResourceExhausted, match="queue is full"):
                e.check_capacity()
            assert e.info().waiting == 2 and e.info().running == 1
            for t in long:
                t.cancel()
            await asyncio.gather(*long, return_exceptions=True)

        asyncio.run(flood())


def test_cancellation_frees_the_slot_at_once(v0, slow):
    with engine(v0, max_concurrent_sequences=1) as e:

        async def scenario():
            hog = asyncio.create_task(e.generate(greedy(PROMPTS[0], 200)))
            await until(lambda: e.info().running == 1, "the hog running")
            waiting = asyncio.create_task(e.generate(greedy(PROMPTS[1], 5)))
            await until(lambda: e.info().waiting == 1, "one waiting")
            assert e.info().running == 1
            hog.cancel()
            t0 = time.perf_counter()
            r = await waiting
            assert r.generated_tokens == 5 and time.perf_counter() - t0 < 1.0
            # A stream closed early frees its slot too.
            async with contextlib.aclosing(e.stream(greedy(PROMPTS[2], 200))) as s:
                async for _ in s:
                    break
            await until(lambda: (e.info().running, e.info().waiting) == (0, 0), "the closed stream's slot", 2.0)

        asyncio.run(scenario())


def test_a_deadline_fails_the_answer_and_frees_its_slot(v0, slow):
    with engine(v0, max_concurrent_sequences=1) as e:

        async def scenario():
            with pytest.raises(errors.DeadlineExceeded, match="deadline of 0.1 s: allow more time"):
                await e.generate(greedy(PROMPTS[0], 200), timeout_s=0.1)
            tokens = 0
            with pytest.raises(errors.DeadlineExceeded, match="deadline of 0.3 s"):  # >= 1 s of tokens
                async for _ in e.stream(greedy(PROMPTS[1], 200), timeout_s=0.3):
                    tokens += 1
            assert 0 < tokens < 200  # it streamed until the deadline, then stopped
            await until(lambda: (e.info().running, e.info().waiting) == (0, 0), "both slots free", 2.0)
            done = await e.generate(greedy(PROMPTS[2], 5), timeout_s=30)  # and answers within it are whole
            assert done.generated_tokens == 5

        asyncio.run(scenario())


async def _first_token_then_result(e: Engine, req: GenerationRequest, started: asyncio.Event):
    async for ev in e.stream(req):
        started.set()
        if ev.result:
            return ev.result


@pytest.mark.parametrize("mixed_drain", [True, False], ids=["one-forward", "forward-per-version"])
def test_hot_swap_in_flight_finish_on_old_weights_new_requests_get_new(v0, v1, slow, mixed_drain):
    with engine(v1, 1) as ref:
        new_alone = [asyncio.run(ref.generate(greedy(p, 40))) for p in PROMPTS[:3]]
    with engine(v0, mixed_drain=mixed_drain) as e:
        old_alone = [asyncio.run(e.generate(greedy(p, 40))) for p in PROMPTS[:3]]

        async def scenario():
            started = [asyncio.Event() for _ in range(3)]
            inflight = [
                asyncio.create_task(_first_token_then_result(e, greedy(p, 40), s))
                for p, s in zip(PROMPTS[:3], started, strict=True)
            ]
            inflight.append(asyncio.create_task(e.generate(greedy(PROMPTS[0], 40))))
            await asyncio.gather(*[s.wait() for s in started])
            await asyncio.to_thread(e.load_version, v1, 1)
            assert e.info().version == 1
            # The old copy stays alive for its sequences: in the new version's batch, or in its own.
            snap = await asyncio.to_thread(e.snapshot)
            old_versions = [b.old_version if mixed_drain else b.version for b in snap.batches]
            assert snap.version == 1 and old_versions == [0] and snap.draining
            fresh = await asyncio.gather(*[e.generate(greedy(p, 40)) for p in PROMPTS[:3]])
            return await asyncio.gather(*inflight), fresh

        old, fresh = asyncio.run(scenario())
        assert [r.version for r in old] == [0, 0, 0, 0] and [r.version for r in fresh] == [1, 1, 1]
        assert [ids(r) for r in old[:3]] == [ids(r) for r in old_alone]
        assert ids(old[3]) == ids(old_alone[0])
        assert [ids(r) for r in fresh] == [ids(r) for r in new_alone]
        assert [ids(r) for r in fresh] != [ids(r) for r in old_alone]
        snap = e.snapshot()
        assert snap.batches == () and not snap.draining  # the old copy left with its last sequence
        # Rollback is just another load; the same announcement twice is a no-op.
        e.load_version(v0, 0)
        e.load_version(v0, 0)
        assert e.info().version == 0
        assert asyncio.run(e.generate(greedy(PROMPTS[0], 40))).version == 0


def test_hot_swap_reprefill_restarts_unseen_answers_on_the_new_weights(v0, v1, slow):
    with engine(v1, 1) as ref:
        new_alone = asyncio.run(ref.generate(greedy(PROMPTS[1], 40)))
    with engine(v0, swap_policy="reprefill") as e:
        old_alone = asyncio.run(e.generate(greedy(PROMPTS[2], 40)))

        async def scenario():
            started = asyncio.Event()
            streamed = asyncio.create_task(_first_token_then_result(e, greedy(PROMPTS[2], 40), started))
            plain = asyncio.create_task(e.generate(greedy(PROMPTS[1], 40)))
            await started.wait()
            await asyncio.to_thread(e.load_version, v1, 1)
            return await plain, await streamed

        plain, streamed = asyncio.run(scenario())
    assert plain.version == 1 and ids(plain) == ids(new_alone)
    assert streamed.version == 0 and ids(streamed) == ids(old_alone)  # its tokens were already sent


def test_bad_checkpoint_is_refused_and_the_old_version_keeps_serving(v0, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(v0, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with engine(v0) as e:
        for path in (str(tmp_path / "missing"), str(broken)):
            with pytest.raises(errors.FailedPrecondition, match="still serving version 0"):
                e.load_version(path, 7)
            assert e.info().version == 0 and "version 7" in e.info().last_swap_error
            assert asyncio.run(e.generate(greedy(PROMPTS[0], 5))).version == 0


VICTIM = "tell me a long story about " + "bread and coffee and music " * 12  # 72 tokens: longer than any other row


def others() -> list[GenerationRequest]:
    """Answers that share a batch with a victim: greedy ones and a seeded sampled one (both paths)."""
    reqs = [greedy(p, 30) for p in PROMPTS[:3]]
    return reqs + [GenerationRequest(prompt=PROMPTS[3], temperature=0.9, top_k=20, seed=5, max_new_tokens=30)]


def poison_rows_past(monkeypatch, position: int) -> None:
    """Every forward sets the logits of the rows whose newest token is at `position` or later to NaN:
    a model that breaks down on one answer (only the victim's row gets that far)."""
    fwd = LoadedModel.forward

    def poisoned(self, input_ids, attention_mask, position_ids, cache, **kw):
        out = fwd(self, input_ids, attention_mask, position_ids, cache, **kw)
        bad = position_ids[:, -1] >= position
        if bool(bad.any()):
            with torch.inference_mode():
                out.logits[bad] = float("nan")
        return out

    monkeypatch.setattr(LoadedModel, "forward", poisoned)


@pytest.mark.parametrize("victim_samples", [False, True], ids=["greedy_victim", "sampled_victim"])
def test_a_row_with_non_finite_logits_fails_alone_and_the_others_finish_normally(v0, slow, monkeypatch, victim_samples):
    with engine(v0, max_concurrent_sequences=8) as e:
        alone = [asyncio.run(e.generate(r)) for r in others()]
        victim_len = len(e.serving_model.encode(VICTIM))
        assert victim_len > max(r.prompt_tokens + r.generated_tokens for r in alone)
        poison_rows_past(monkeypatch, victim_len + 2)  # the forward that feeds its 3rd token: in the running batch
        victim = GenerationRequest(prompt=VICTIM, max_new_tokens=30, ignore_eos=True, temperature=0.0)
        if victim_samples:
            victim = GenerationRequest(prompt=VICTIM, max_new_tokens=30, temperature=1.0, seed=3, logprobs=True)

        async def scenario():
            running = [asyncio.create_task(e.generate(r)) for r in others()]
            await until(lambda: e.info().running == len(running), "the others running")
            tokens: list[str] = []
            with pytest.raises(AnswerFailed) as info:
                async for ev in e.stream(victim):
                    tokens.append(ev.text)
            return info.value, len(tokens), await asyncio.gather(*running)

        err, streamed, results = asyncio.run(scenario())
        assert err.code == grpc.StatusCode.INTERNAL and err.reason == "non_finite_logits"
        assert "non-finite logits for this answer at token 4; it was stopped" in err.message
        assert not err.internal  # fixed text, shown to the caller as it is
        assert streamed == 3  # its first three tokens reached the caller, then the failure
        for got, want in zip(results, alone, strict=True):
            assert (ids(got), got.text, got.finish_reason) == (ids(want), want.text, want.finish_reason)
        monkeypatch.undo()
        info_ = e.info()
        assert (info_.running, info_.waiting, info_.ready) == (0, 0, True)
        assert asyncio.run(e.generate(greedy(VICTIM, 5))).generated_tokens == 5  # the engine goes on


UNUSABLE = [
    ({"temperature": 1e-40, "do_sample": True}, "temperature = 1e-40: use 0 (greedy) or a value from 0.01 to 100"),
    ({"repetition_penalty": 1e-45}, "repetition_penalty = 1e-45: use a value from 0.01 to 100"),
    ({"top_k": 2**63, "temperature": 1.0}, "top_k = 9223372036854775808: use a value from 0 (off) to 1000000"),
    ({"temperature": float("inf")}, "temperature = inf: use a finite number"),
    ({"seed": 2**63}, "seed = 9223372036854775808: use an integer from 0 to 2^63-1"),
]


def test_unusable_sampling_values_are_refused_and_the_answers_in_flight_are_untouched(v0, slow):
    with engine(v0, max_concurrent_sequences=8) as e:
        alone = [asyncio.run(e.generate(r)) for r in others()]

        async def scenario():
            running = [asyncio.create_task(e.generate(r)) for r in others()]
            await until(lambda: e.info().running == len(running), "the others running")
            for bad, why in UNUSABLE:
                with pytest.raises(errors.InvalidArgument) as info:
                    await e.generate(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=20, **bad))
                assert why in info.value.message
            assert e.info().running == len(running)  # refused before admission, the others still run
            return await asyncio.gather(*running)

        for got, want in zip(asyncio.run(scenario()), alone, strict=True):
            assert (ids(got), got.text) == (ids(want), want.text)


def test_limits_come_from_the_limits_config(v0):
    limits = LimitsConfig(max_prompt_chars=10, max_chat_messages=2, max_stop_sequences=1, max_top_k=5)
    e = Engine(EngineConfig(device="cpu"), limits=limits)
    e.start()
    e.load_version(v0, 0)
    try:
        chat = [{"role": "user", "content": "hi"}] * 3
        for req, why in [
            (GenerationRequest(prompt="x" * 11), "the prompt has 11 characters, over the limit of 10"),
            (GenerationRequest(messages=chat), "the chat has 3 messages, over the limit of 2"),
            (GenerationRequest(prompt="hi", stop=["a", "b"]), "2 stop sequences: send at most 1"),
            (GenerationRequest(prompt="hi", top_k=6), "top_k = 6: use a value from 0 (off) to 5"),
        ]:
            with pytest.raises(errors.InvalidArgument) as info:
                asyncio.run(e.generate(req))
            assert why in info.value.message
        assert asyncio.run(e.generate(greedy("x" * 10, 3))).generated_tokens == 3
    finally:
        e.stop()


def test_a_failing_step_fails_its_sequences_and_the_engine_keeps_serving(v0, monkeypatch):
    with engine(v0) as e:
        fwd = LoadedModel.forward

        def broken(self, *a, **k):
            monkeypatch.setattr(LoadedModel, "forward", fwd)  # fail once
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(LoadedModel, "forward", broken)
        with pytest.raises(errors.ResourceExhausted, match="ran out of memory on a step") as info:
            asyncio.run(e.generate(greedy(PROMPTS[0], 5)))
        assert "simulated" not in info.value.message  # no exception text reaches the caller
        assert asyncio.run(e.generate(greedy(PROMPTS[0], 5))).generated_tokens == 5
        info = e.info()
        assert (info.version, info.running, info.waiting, info.ready) == (0, 0, 0, True)
        assert info.max_context_tokens == 256 and info.max_new_tokens == 255


def test_stop_fails_waiting_requests_with_unavailable(v0, slow):
    e = Engine(EngineConfig(device="cpu", max_concurrent_sequences=1))
    e.start()
    e.load_version(v0, 0)

    async def scenario():
        tasks = [asyncio.create_task(e.generate(greedy(p, 100))) for p in PROMPTS[:3]]
        await until(lambda: e.info().running == 1 and e.info().waiting == 2, "one running, two waiting")
        await asyncio.to_thread(e.stop)
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, errors.Unavailable) for o in outcomes)
    with pytest.raises(errors.Unavailable):
        asyncio.run(e.generate(greedy(PROMPTS[0], 5)))


def test_another_architecture_gpt2_batches_exactly(v0, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(v0)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, eos_token_id=tok.eos_token_id
    )
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with engine(str(tmp_path)) as e:
        assert e.info().max_context_tokens == 128
        alone = [asyncio.run(e.generate(greedy(p, 12))) for p in PROMPTS]

        async def together():
            return await asyncio.gather(*[e.generate(greedy(p, 12)) for p in PROMPTS])

        assert [ids(r) for r in asyncio.run(together())] == [ids(r) for r in alone]


def test_new_weights_alone_reload_into_a_copy_of_the_serving_model(v0, v2, monkeypatch):
    with engine(v2, 2) as ref:  # from_pretrained: nothing to reuse
        want = [ids(asyncio.run(ref.generate(greedy(p, 20)))) for p in PROMPTS[:3]]
    with engine(v0) as e:
        old = e.serving_model
        with monkeypatch.context() as m:  # the swap must not need from_pretrained
            m.setattr(hotswap_module, "load_model", lambda *a: pytest.fail("from_pretrained on the hot path"))
            e.load_version(v2, 2)
        new = e.serving_model
        assert old is not None and new is not None
        assert new.version == 2 and new.source == v2 and new.model is not old.model
        assert new.tokenizer is old.tokenizer and new.mask_4d == old.mask_4d
        got = [asyncio.run(e.generate(greedy(p, 20))) for p in PROMPTS[:3]]
        assert [r.version for r in got] == [2, 2, 2] and [ids(r) for r in got] == want
        assert all(not torch.equal(a, b) for a, b in zip(old.model.parameters(), new.model.parameters(), strict=True))


def test_reload_needs_the_same_model_files_and_an_equivalent_tokenizer(v0, v1, v2, tmp_path):
    with engine(v0) as e:
        cur = e.serving_model
        assert cur is not None
        assert reload_weights(cur, v2, 2).tokenizer is cur.tokenizer  # the same bytes: shared
        again = reload_weights(cur, v1, 1)  # saved otherwise (no starter.json, other JSON layout)
        assert again is not None and again.tokenizer is not cur.tokenizer
        edits = {
            "config.json": lambda text: text + " ",  # another architecture, as far as we know
            "tokenizer_config.json": lambda text: text.replace('"model_max_length": 256', '"model_max_length": 99'),
        }
        for name, edit in edits.items():
            other = tmp_path / name
            shutil.copytree(v2, other)
            text = (other / name).read_text()
            assert edit(text) != text
            (other / name).write_text(edit(text))
            assert reload_weights(cur, str(other), 3) is None


def test_a_failing_reload_falls_back_to_a_whole_load(v0, v2, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("cannot deepcopy this module")

    monkeypatch.setattr(reload_module, "reload_weights", boom)
    with engine(v0) as e:
        e.load_version(v2, 2)
        assert asyncio.run(e.generate(greedy(PROMPTS[0], 5))).version == 2 and not e.info().last_swap_error


def test_the_python_heavy_parts_of_a_reload_run_between_steps_in_the_scheduler_thread(v0, v2, monkeypatch):
    ran_in: list[str] = []
    real = reload_module.empty_copy

    def spy(model, reuse):
        ran_in.append(threading.current_thread().name)
        return real(model, reuse)

    monkeypatch.setattr(reload_module, "empty_copy", spy)
    with engine(v0) as e:
        e.load_version(v2, 2)
        assert ran_in == ["policy-engine"]
        with pytest.raises(ZeroDivisionError):  # a chore's error reaches the caller; the scheduler lives on
            e.between_steps(lambda: 1 / 0)
        assert asyncio.run(e.generate(greedy(PROMPTS[0], 5))).version == 2
    assert e.between_steps(lambda: threading.current_thread().name) == threading.current_thread().name


def test_the_copy_gets_new_parameters_with_the_ties_kept_and_the_buffers_copied(v0):
    with engine(v0) as e:
        cur = e.serving_model.model
        new = reload_module.empty_copy(cur)
    old_params, new_params = dict(cur.named_parameters()), dict(new.named_parameters())
    assert old_params.keys() == new_params.keys()
    assert all(new_params[k] is not p and new_params[k].shape == p.shape for k, p in old_params.items())
    assert new.get_input_embeddings().weight is new.get_output_embeddings().weight  # tied, as in cur
    for (k, b), (_, c) in zip(cur.named_buffers(), new.named_buffers(), strict=True):
        assert c is not b and torch.equal(c, b), k
    for (k, a), (_, b) in zip(cur.named_modules(), new.named_modules(), strict=True):  # new modules, own hooks
        assert type(b) is type(a) and b is not a and b._forward_hooks is not a._forward_hooks, k
    assert new.config is cur.config  # the files said so: shared, not copied


def test_a_failed_verification_switches_nothing(v0, v2):
    def refuse():
        raise errors.IntegrityError("file 'model.safetensors' has sha256 0badc0ffee..., manifest says 1234...")

    with engine(v0) as e:
        with pytest.raises(errors.IntegrityError, match="sha256"):
            e.load_version(v2, 2, verify=refuse)
        assert e.info().version == 0 and asyncio.run(e.generate(greedy(PROMPTS[0], 5))).version == 0
        e.load_version(v2, 2, verify=lambda: None)
        assert asyncio.run(e.generate(greedy(PROMPTS[0], 5))).version == 2


def test_non_finite_new_weights_are_refused_on_the_reload_path_too(v0, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(v0, bad)
    weights = load_file(bad / "model.safetensors")
    weights = {k: t * float("nan") if "norm" in k else t for k, t in weights.items()}
    save_file(weights, bad / "model.safetensors", {"format": "pt"})
    with engine(v0) as e:
        with pytest.raises(errors.FailedPrecondition, match="non-finite"):
            e.load_version(str(bad), 8)
        assert asyncio.run(e.generate(greedy(PROMPTS[0], 5))).version == 0


def test_a_swapped_out_model_is_freed_without_the_garbage_collector(v0, v2):
    """The engine freezes the objects of its first load out of the collector's reach (no full
    collection pauses during swaps): a model it swaps out must still go by reference counting."""
    with engine(v0) as e:
        asyncio.run(e.generate(greedy(PROMPTS[0], 5)))
        for path, version in ((v2, 2), (v0, 0)):  # reload path, then from_pretrained
            gone = weakref.ref(e.serving_model.model)
            gc.disable()
            try:
                e.load_version(path, version)
                assert asyncio.run(e.generate(greedy(PROMPTS[0], 5))).version == version
                assert gone() is None
            finally:
                gc.enable()


def test_a_swap_to_another_architecture_loads_it_whole(v0, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(v0)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with engine(str(tmp_path), 5) as ref:
        want = ids(asyncio.run(ref.generate(greedy(PROMPTS[0], 12))))
    with engine(v0) as e:
        assert reload_weights(e.serving_model, str(tmp_path), 5) is None
        e.load_version(str(tmp_path), 5)
        got = asyncio.run(e.generate(greedy(PROMPTS[0], 12)))
        assert got.version == 5 and ids(got) == want and e.info().max_context_tokens == 128
