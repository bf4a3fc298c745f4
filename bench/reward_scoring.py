"""ScoreBatch throughput through the real gRPC reward service vs the model called directly.

Same process, same inputs, same scorer chunk size: (1) the model's own `score()` (baseline),
(2) gRPC ScoreBatch with `--batch` items per call, (3) gRPC Score, one call per item. Prints
items ((prompt, response) pairs) per second and the ratios. No Kafka needed: the servicer and
scorer are the service's own, only the join/trainer are not started.

    .venv/bin/python bench/reward_scoring.py --model minilm --items 512 --batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
import torch  # noqa: E402

from flywheel.core.modelstore import ModelStore, ModelStoreConfig  # noqa: E402
from flywheel.core.server import ServerConfig  # noqa: E402
from flywheel.reward.config import JoinConfig, RewardModelConfig, ScoreConfig  # noqa: E402
from flywheel.reward.model import RewardModel  # noqa: E402
from flywheel.reward.server import RewardService, RewardServiceConfig, build_server  # noqa: E402
from flywheel.reward.starter import ensure_starter  # noqa: E402
from flywheel.testing import tiny_reward_model  # noqa: E402
from flywheel.v1 import reward_pb2, reward_pb2_grpc  # noqa: E402

WORDS = "the river stone green quick model answer light table house blue seven market paper garden".split()


def inputs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts = ["Question: " + " ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + "?" for _ in range(n)]
    responses = [" ".join(rng.choices(WORDS, k=rng.randint(10, 40))) + "." for _ in range(n)]
    return prompts, responses


async def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    store = ModelStore(tmp / "store")
    model_cfg = RewardModelConfig(max_length=args.max_length, device=args.device)
    if args.model == "tiny":
        store.publish("reward", lambda d: tiny_reward_model(d), parent=None, version=0)
    else:
        ensure_starter(store, model_cfg)
    cfg = RewardServiceConfig(
        join=JoinConfig(state_dir=str(tmp / "state")),
        model=model_cfg,
        score=ScoreConfig(chunk_size=args.chunk, max_batch_items=max(args.batch, 1)),
        store=ModelStoreConfig(root=str(tmp / "store")),
    )
    service = RewardService(cfg)
    path = store.load_path("reward", 0)
    service.scorer.load(path, 0)
    server = build_server(service, ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=1))
    await server.start(handle_signals=False)
    await server.set_serving(True)
    prompts, responses = inputs(args.items)
    direct = RewardModel.load(path, args.max_length, args.device)
    direct.model.eval()
    res: dict = {
        "model": args.model,
        "items": args.items,
        "batch": args.batch,
        "chunk": args.chunk,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            stub = reward_pb2_grpc.RewardStub(ch)
            items = [reward_pb2.ScoreRequest(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
            await stub.ScoreBatch(reward_pb2.ScoreBatchRequest(items=items[: args.batch]))  # warm up
            direct.score(prompts[: args.batch], responses[: args.batch], args.chunk)
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                base = []
                for i in range(0, args.items, args.batch):
                    base += direct.score(prompts[i : i + args.batch], responses[i : i + args.batch], args.chunk)
                t_direct = time.perf_counter() - t0

                t0 = time.perf_counter()
                served = []
                for i in range(0, args.items, args.batch):
                    out = await stub.ScoreBatch(reward_pb2.ScoreBatchRequest(items=items[i : i + args.batch]))
                    served += list(out.scores)
                t_batch = time.perf_counter() - t0
                assert len(served) == len(base)
                assert max(abs(a - b) for a, b in zip(served, base, strict=True)) < 1e-3, "served scores differ"

                n_single = min(args.items, args.single_items)
                t0 = time.perf_counter()
                for it in items[:n_single]:
                    await stub.Score(it)
                t_single = time.perf_counter() - t0
                res[f"run{rep}"] = {
                    "direct_items_per_s": args.items / t_direct,
                    "scorebatch_items_per_s": args.items / t_batch,
                    "score_items_per_s": n_single / t_single,
                }
    finally:
        await server.stop(grace=0)
        service.stop()
    runs = [v for k, v in res.items() if k.startswith("run")]
    best = {k: max(r[k] for r in runs) for k in runs[0]}  # best of N per measure: the machine is shared
    res.update(best)
    res["ratio_scorebatch_vs_direct"] = best["scorebatch_items_per_s"] / best["direct_items_per_s"]
    res["ratio_scorebatch_vs_single_score"] = best["scorebatch_items_per_s"] / best["score_items_per_s"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    p.add_argument("--items", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="items per ScoreBatch call (and per direct call)")
    p.add_argument("--chunk", type=int, default=64, help="items per model forward")
    p.add_argument("--single-items", type=int, default=128, help="items scored with one Score call each")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (scorer and baseline alike)")
    res = asyncio.run(run(p.parse_args()))
    print(json.dumps(res, indent=2))
    print(
        f"ScoreBatch {res['scorebatch_items_per_s']:.0f} items/s vs direct model {res['direct_items_per_s']:.0f} "
        f"items/s: ratio {res['ratio_scorebatch_vs_direct']:.3f}; vs one Score per item "
        f"{res['score_items_per_s']:.0f} items/s: {res['ratio_scorebatch_vs_single_score']:.1f}x"
    )


if __name__ == "__main__":
    main()
