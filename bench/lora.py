"""LoRA adapter versions against full weights on a random-init Llama (~0.47B by default), in one run:
1. model-store bytes per version: one full version and one LoRA adapter version (rank --rank,
   the trainer's default target modules) published into a temporary ModelStore with the project's
   own code (`modelstore.save_pretrained`, `trainer.adapters.save_adapter`, the base named in the
   manifest as the trainer names it); target (issue 20) adapter/full <= 2%.
2. trainer memory for one RLOO-like step (policy forward + backward + AdamW step, reference
   forward, on --batch sequences of --seq tokens): full weights (the policy plus a second full
   copy as its reference, as the whole-weights trainer keeps) against LoRA (`adapters.attach_lora`,
   the reference is the adapter switched off, `adapters.AdapterOff`); peak RSS (getrusage maxrss)
   (VmHWM) of a fresh subprocess per variant, and the RSS after imports alone; the issue expects well under
   0.5x.
3. swap cost: `Swapper.apply` of the store's announcement (`ModelStore.to_update`, no Kafka) into
   a running Engine serving the base: verify + load + switch, adapter version (served unmerged on
   the base in memory, `flywheel.policy.lora`) vs full version, --swaps of each; the ratio of the
   medians, target <= 0.1x.
4. the price of unmerged serving: a decode step of --rows rows on the adapter against the same
   step on whole weights, and a swap's drain step (half the rows on the base, half on the adapter,
   one forward: `lora.AdapterMix`) against the adapter's steady step; medians of --steps steps.
5. GeneratePair memory: the resident memory (VmRSS) of a fresh process with one engine serving the
   base, then after one pair against a candidate: the adapter pinned on the serving weights
   (target <= 1.15x), and a whole-weights candidate on a second engine (about 2x).
6. swaps under load: callers ask without pause while the engine swaps between the base and the
   adapter --load-swaps times; every answer must succeed and be its reported version's own
   greedy answer (0 failed, 0 wrong versions).

  .venv/bin/python bench/lora.py                                  # ~0.47B, float32, CPU
  .venv/bin/python bench/lora.py --layers 12                      # half the layers
  .venv/bin/python bench/lora.py --hidden 256 --layers 4 --intermediate 688 --heads 4  # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flywheel.core.modelstore import BaseRef, ModelStore, save_pretrained
from flywheel.trainer.config import TrainerConfig

MODEL = "policy"


def make_model(out: Path, args: argparse.Namespace) -> int:
    """A random-init Llama of the given shape with the starter's tokenizer, saved to `out`; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flywheel.policy import corpus
    from flywheel.policy.starter import build_tokenizer

    tok = build_tokenizer([f"{e.prompt} {e.answer}" for e in corpus.generate(2000, 0)])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab or len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.seq),
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def lora_cfg(rank: int) -> TrainerConfig:
    return TrainerConfig(adapter="lora", lora_rank=rank, lora_alpha=2 * rank)


# ---------------------------------------------------------------------- 1. bytes per version
def publish_versions(store: ModelStore, model_dir: Path, rank: int) -> dict:
    """v0: the base (full), v1: a full version (the weights scaled by 1.001), v2: a LoRA adapter on v0
    whose B matrices are random (a trained adapter's merge does real work)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.trainer.adapters import attach_lora, save_adapter

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    base = store.publish(MODEL, lambda d: save_pretrained(model, tok, d), parent=None, version=0)
    full_publish_s = time.perf_counter() - t0
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
    full = store.publish(MODEL, lambda d: save_pretrained(model, tok, d), parent=0, version=1)
    model = None  # the base is loaded again under the adapter
    peft = attach_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_cfg(rank))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    t0 = time.perf_counter()
    adapter = store.publish(
        MODEL,
        lambda d: save_adapter(peft, tok, d),
        parent=0,
        version=2,
        extra={"base": BaseRef.of(base).to_dict()},
    )
    adapter_publish_s = time.perf_counter() - t0
    adapter_params = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    return {
        "full_bytes": full.bytes,
        "adapter_bytes": adapter.bytes,
        "adapter_over_full": adapter.bytes / full.bytes,
        "adapter_kind": adapter.kind,
        "adapter_params": adapter_params,
        "full_publish_s": full_publish_s,
        "adapter_publish_s": adapter_publish_s,
    }


# ---------------------------------------------------------------------- 2. trainer memory (child)
def maxrss_bytes() -> int:
    """This process's peak RSS: VmHWM (its own address space's high-water mark). getrusage's maxrss
    is not used where /proc is: Linux carries it over fork and exec, so a child would report the
    parent's RSS at the fork when that is higher than its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def train_step_child(variant: str, model_dir: str, rank: int, batch: int, seq: int) -> dict:
    """One RLOO-like step in this (fresh) process; prints its peak RSS."""
    from transformers import AutoModelForCausalLM

    from flywheel.trainer.adapters import AdapterOff, as_model, attach_lora

    rss_imports = maxrss_bytes()
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if variant == "full":
        ref: object = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        for p in ref.parameters():  # type: ignore[attr-defined]
            p.requires_grad_(False)
        train_model, params = policy, [p for p in policy.parameters() if p.requires_grad]
    else:
        peft = attach_lora(policy, lora_cfg(rank))
        ref = AdapterOff(peft)
        train_model, params = peft, [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    rss_loaded = maxrss_bytes()
    vocab = policy.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    adv = torch.randn(batch)
    train_model.train()
    t0 = time.perf_counter()
    with torch.no_grad(), as_model(ref) as r:  # type: ignore[arg-type]
        ref_lp = torch.log_softmax(r(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        ref_lp = ref_lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    logits = train_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    kl = (lp - ref_lp).mean()
    loss = -(adv[:, None] * lp).mean() + 0.05 * kl
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    return {
        "peak_rss_bytes": maxrss_bytes(),
        "rss_after_imports_bytes": rss_imports,
        "rss_after_load_bytes": rss_loaded,
        "trainable_params": sum(p.numel() for p in params),
        "step_s": step_s,
    }


def measure_train(variant: str, model_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--child-model", str(model_dir)]
    cmd += ["--rank", str(args.rank), "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- 3. swap cost
def measure_swaps(store: ModelStore, swaps: int) -> dict:
    """An Engine serving v0; then `swaps` rounds of: the adapter (v2, on v0), the full v1, the full
    v0 again. Each is `Swapper.apply` of the store's own announcement (no Kafka)."""
    from flywheel.core.config import KafkaConfig
    from flywheel.policy.config import EngineConfig
    from flywheel.policy.engine import Engine
    from flywheel.policy.swap import Swapper

    engine = Engine(EngineConfig(device="cpu", dtype="float32", swap_worker=False))
    engine.start()
    swapper = Swapper(engine, store, KafkaConfig(), "unused", MODEL, "bench-lora")
    try:
        t0 = time.perf_counter()
        swapper.load_from_store(0)
        first_load_s = time.perf_counter() - t0
        ups = {v: store.to_update(store.get(MODEL, v), "bench") for v in (0, 1, 2)}
        times: dict[str, list[float]] = {"adapter": [], "full": []}
        for _ in range(swaps):
            for v, kind in ((2, "adapter"), (1, "full"), (0, "full")):
                t0 = time.perf_counter()
                ok = swapper.apply(ups[v])
                dt = time.perf_counter() - t0
                if not ok or engine.info().version != v:
                    raise RuntimeError(f"swap to v{v} failed: {swapper.last_error}")
                times[kind].append(dt)
        return {"first_load_s": first_load_s, **times}
    finally:
        swapper.stop()
        engine.stop()


# ---------------------------------------------------------------------- 6. swaps under load
def measure_swaps_under_load(store: ModelStore, swaps: int, clients: int, tokens: int) -> dict:
    """`clients` callers ask for greedy answers without pause while the engine swaps `swaps` times between
    the base (v0) and the adapter on it (v2). Counts the answers, the failed ones, and the wrong ones: an
    answer whose tokens are not its reported version's own greedy answer (measured alone first)."""
    import asyncio

    from flywheel.core.config import KafkaConfig
    from flywheel.policy.config import EngineConfig
    from flywheel.policy.engine import Engine
    from flywheel.policy.requests import GenerationRequest
    from flywheel.policy.swap import Swapper

    engine = Engine(EngineConfig(device="cpu", dtype="float32", swap_worker=False))
    engine.start()
    swapper = Swapper(engine, store, KafkaConfig(), "unused", MODEL, "bench-lora")
    req = GenerationRequest(prompt="where is my order?", temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    ups = {v: store.to_update(store.get(MODEL, v), "bench") for v in (0, 2)}
    try:
        swapper.load_from_store(0)
        want = {}
        for v in (2, 0):
            swapper.apply(ups[v])
            want[v] = [t.id for t in asyncio.run(engine.generate(req)).tokens]
        got = {"answers": 0, "failed": 0, "wrong": 0, "by_version": {0: 0, 2: 0}}

        async def client(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    r = await engine.generate(req)
                except Exception:  # noqa: BLE001 - counted: the figure is how many
                    got["failed"] += 1
                    continue
                got["answers"] += 1
                got["by_version"][r.version] = got["by_version"].get(r.version, 0) + 1
                got["wrong"] += [t.id for t in r.tokens] != want.get(r.version)

        async def run() -> None:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(client(stop)) for _ in range(clients)]
            for i in range(swaps):
                await asyncio.sleep(0.5)
                if not await asyncio.to_thread(swapper.apply, ups[2 if i % 2 == 0 else 0]):
                    raise RuntimeError(f"swap failed: {swapper.last_error}")
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)

        asyncio.run(run())
        return got
    finally:
        swapper.stop()
        engine.stop()


# ---------------------------------------------------------------------- 5. GeneratePair memory (child)
def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def pair_memory_child(variant: str, store_root: str) -> dict:
    """An Engine serving v0 answers; then one pair's side B on a candidate, as the policy service runs it:
    `adapter` (v2) pinned to an adapter variant of the serving weights, or `full` (v1) on a second engine.
    Prints the RSS after the serving engine's answer and after the pair's."""
    import asyncio
    import gc

    from flywheel.core.config import KafkaConfig
    from flywheel.policy.config import EngineConfig
    from flywheel.policy.engine import Engine
    from flywheel.policy.requests import GenerationRequest
    from flywheel.policy.swap import Swapper

    store = ModelStore(Path(store_root))
    config = EngineConfig(device="cpu", dtype="float32", swap_worker=False)
    engine = Engine(config)
    engine.start()
    engines = [engine]
    try:
        swapper = Swapper(engine, store, KafkaConfig(), "unused", MODEL, "bench-lora")
        swapper.load_from_store(0)
        req = GenerationRequest(prompt="where is my order?", temperature=0.0, max_new_tokens=8, ignore_eos=True)
        asyncio.run(engine.generate(req))
        gc.collect()
        one_engine = rss_bytes()
        if variant == "adapter":
            on = swapper.variant(2)

            async def pair() -> None:
                await asyncio.gather(engine.generate(req), engine.generate(req, on=on))

            asyncio.run(pair())
        else:
            second = Engine(config)
            second.start()
            engines.append(second)
            swapper.load_into(second, 1)

            async def pair() -> None:
                await asyncio.gather(engine.generate(req), second.generate(req))

            asyncio.run(pair())
        gc.collect()
        return {"one_engine_rss_bytes": one_engine, "with_pair_rss_bytes": rss_bytes()}
    finally:
        for e in engines:
            e.stop()


def measure_pair_memory(variant: str, store_root: Path) -> dict:
    cmd = [sys.executable, __file__, "--pair-child", variant, "--child-model", str(store_root)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- 4. decode with an unmerged adapter
class _Row:  # what kvbatch.Batch reads of a sequence
    def __init__(self, prompt_ids: list[int], model: object) -> None:
        self.prompt_ids, self.model = prompt_ids, model


def measure_decode(store: ModelStore, rows: int, steps: int) -> dict:
    """Median decode-step seconds over `rows` rows: whole weights (v0), the adapter v2 on v0, and a
    drain of rows/2 base rows and rows/2 adapter rows in one forward."""
    import dataclasses
    import statistics

    from flywheel.policy.config import EngineConfig
    from flywheel.policy.kvbatch import Batch, load_model
    from flywheel.policy.lora import AdapterMix, LoraAdapter

    base = load_model(str(store.version_path(MODEL, 0)), 0, EngineConfig(device="cpu", dtype="float32"))
    adapter = LoraAdapter.load(store.version_path(MODEL, 2), base.model, base.device, base.dtype)
    on = dataclasses.replace(base, version=2, adapter=adapter)
    prompts = [[5 + i, 6 + i, 7 + i, 8 + i] for i in range(rows)]

    def step_times(first, rest=None) -> float:
        half = rows // 2 if rest is not None else rows
        batch = Batch.prefill(first, [_Row(p, first) for p in prompts[:half]])
        batch.next_ids = batch.last_logits.argmax(-1)
        if rest is not None:
            batch.adopt(AdapterMix(first, rest))
            more = Batch.prefill(rest, [_Row(p, rest) for p in prompts[half:]])
            more.next_ids = more.last_logits.argmax(-1)
            batch.merge(more)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            batch.next_ids = batch.decode().argmax(-1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    step_times(base)  # warm-up
    return {"whole_s": step_times(base), "adapter_s": step_times(on), "drain_s": step_times(base, on)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--intermediate", type=int, default=3456)
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the starter tokenizer's)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank, default target modules)")
    ap.add_argument("--batch", type=int, default=4, help="sequences in the trainer step")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence in the trainer step")
    ap.add_argument("--swaps", type=int, default=2, help="rounds of (adapter, full, full) swaps")
    ap.add_argument("--rows", type=int, default=4, help="rows of the decode-step measurement")
    ap.add_argument("--steps", type=int, default=20, help="decode steps measured per variant")
    ap.add_argument("--load-swaps", type=int, default=6, help="swaps between base and adapter under load")
    ap.add_argument("--clients", type=int, default=4, help="callers asking without pause during those swaps")
    ap.add_argument("--skip-train", action="store_true", help="leave out the trainer-memory measurement")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    ap.add_argument("--pair-child", choices=("adapter", "full"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(train_step_child(args.child, args.child_model, args.rank, args.batch, args.seq)))
        return
    if args.pair_child:
        print(json.dumps(pair_memory_child(args.pair_child, args.child_model)))
        return

    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-lora-"))
    gib = 1 << 30
    try:
        t0 = time.perf_counter()
        params = make_model(root / "model", args)
        print(f"model: {params / 1e6:.0f}M parameters, built in {time.perf_counter() - t0:.0f}s", flush=True)
        store = ModelStore(root / "store")
        b = publish_versions(store, root / "model", args.rank)
        print(
            f"bytes per version: full {b['full_bytes'] / 1e6:.1f} MB, adapter {b['adapter_bytes'] / 1e6:.2f} MB"
            f" -> {100 * b['adapter_over_full']:.2f}% (target <= 2%)",
            flush=True,
        )
        train: dict = {}
        if not args.skip_train:
            for variant in ("full", "lora"):
                train[variant] = measure_train(variant, root / "model", args)
                t = train[variant]
                print(
                    f"trainer step ({variant}): peak RSS {t['peak_rss_bytes'] / gib:.2f} GiB"
                    f" (imports {t['rss_after_imports_bytes'] / gib:.2f}), step {t['step_s']:.1f}s",
                    flush=True,
                )
            ratio = train["lora"]["peak_rss_bytes"] / train["full"]["peak_rss_bytes"]
            above = [train[v]["peak_rss_bytes"] - train[v]["rss_after_imports_bytes"] for v in ("lora", "full")]
            print(
                f"trainer peak RSS lora/full: {ratio:.3f}x; above the imports' RSS: {above[0] / above[1]:.3f}x"
                " (expected well under 0.5x)",
                flush=True,
            )
        s = measure_swaps(store, args.swaps)
        ad, fu = statistics.median(s["adapter"]), statistics.median(s["full"])  # medians: a cold read can take 5x
        print(
            f"swap (verify + load + switch), medians: adapter {ad:.3f}s, full {fu:.2f}s -> {ad / fu:.3f}x"
            " (target <= 0.1x)",
            flush=True,
        )
        d = measure_decode(store, args.rows, args.steps)
        print(
            f"decode step of {args.rows} rows: whole weights {1e3 * d['whole_s']:.1f} ms, adapter unmerged"
            f" {1e3 * d['adapter_s']:.1f} ms ({d['adapter_s'] / d['whole_s']:.2f}x); a drain's mixed step"
            f" {1e3 * d['drain_s']:.1f} ms ({d['drain_s'] / d['adapter_s']:.2f}x the adapter's)",
            flush=True,
        )
        pairs = {v: measure_pair_memory(v, root / "store") for v in ("adapter", "full")}
        pair_ratio = {v: pairs[v]["with_pair_rss_bytes"] / pairs[v]["one_engine_rss_bytes"] for v in pairs}
        print(
            f"GeneratePair resident memory over one engine's: adapter candidate {pair_ratio['adapter']:.3f}x"
            f" (target <= 1.15x), whole-weights candidate (a second engine) {pair_ratio['full']:.2f}x",
            flush=True,
        )
        load = measure_swaps_under_load(store, args.load_swaps, args.clients, 8)
        print(
            f"{args.load_swaps} swaps between the base and the adapter under {args.clients} callers:"
            f" {load['answers']} answers {load['by_version']}, {load['failed']} failed, {load['wrong']} wrong"
            " (target 0 and 0)",
            flush=True,
        )
        out = {
            "device": "cpu",
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "params": params,
            "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "vocab")},
            "lora_rank": args.rank,
            "lora_targets": list(lora_cfg(args.rank).lora_target_modules),
            "bytes": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in b.items()},
            "train_step": {"batch": args.batch, "seq": args.seq, **train},
            "train_peak_rss_lora_over_full": (
                round(train["lora"]["peak_rss_bytes"] / train["full"]["peak_rss_bytes"], 3) if train else None
            ),
            "train_peak_rss_above_imports_lora_over_full": (
                round(
                    (train["lora"]["peak_rss_bytes"] - train["lora"]["rss_after_imports_bytes"])
                    / (train["full"]["peak_rss_bytes"] - train["full"]["rss_after_imports_bytes"]),
                    3,
                )
                if train
                else None
            ),
            "swap_s": {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) for k, v in s.items()},
            "swap_adapter_over_full": round(ad / fu, 3),
            "decode_step": {"rows": args.rows, "steps": args.steps, **{k: round(v, 5) for k, v in d.items()}},
            "decode_adapter_over_whole": round(d["adapter_s"] / d["whole_s"], 3),
            "decode_drain_over_adapter": round(d["drain_s"] / d["adapter_s"], 3),
            "swaps_under_load": {"swaps": args.load_swaps, "clients": args.clients, **load},
            "pair_rss_bytes": pairs,
            "pair_rss_over_one_engine": {v: round(r, 3) for v, r in pair_ratio.items()},
        }
        print(json.dumps(out, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
