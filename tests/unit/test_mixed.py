"""One forward for two versions' rows (a hot swap's drain): exact per row, refused where it cannot be."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from flywheel.policy.config import EngineConfig
from flywheel.policy.kvbatch import Batch, LoadedModel, load_model
from flywheel.policy.mixed import MixedForward, NotRowwise, routed, scales_rows
from tests.unit.test_engine import v0, v1  # noqa: F401 - fixtures

CONFIG = EngineConfig(device="cpu")


class Row:  # what Batch reads of a sequence
    def __init__(self, prompt_ids: list[int], model: LoadedModel) -> None:
        self.prompt_ids, self.model = prompt_ids, model


def _batch(m: LoadedModel, prompts: list[list[int]]) -> Batch:
    b = Batch.prefill(m, [Row(p, m) for p in prompts])
    b.next_ids = b.last_logits.argmax(-1)
    return b


def _decode(b: Batch, steps: int) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        logits = b.decode()
        b.next_ids = logits.argmax(-1)
        out.append(logits)
    return out


def test_mixed_batch_decodes_each_row_on_its_own_version(v0, v1):  # noqa: F811
    old, new = load_model(v0, 0, CONFIG), load_model(v1, 1, CONFIG)
    assert old.routable_modules and new.routable_modules == old.routable_modules
    assert old.row_weighted and set(old.row_weighted) < set(old.routable_modules)  # the norms: v1's differ too
    mix = MixedForward.pair(old, new)
    assert mix is not None
    old_prompts, new_prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]], [[14, 15], [16, 17, 18, 19]]
    want_old = torch.stack(_decode(_batch(old, old_prompts), 6))
    want_new = torch.stack(_decode(_batch(new, new_prompts), 3))

    # The old rows run 2 steps, the batch adopts the new version (1 step with only old rows), then
    # new rows join behind them for 3 steps.
    mixed = _batch(old, old_prompts)
    got = _decode(mixed, 2)
    mixed.adopt(mix)
    got += _decode(mixed, 1)
    mixed.merge(_batch(new, new_prompts))
    assert (mixed.model, mixed.old_rows) == (new, 3)
    together = torch.stack(_decode(mixed, 3))
    got_old = torch.cat([torch.stack(got), together[:, :3]])
    torch.testing.assert_close(got_old, want_old, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[:, 3:], want_new, atol=1e-4, rtol=1e-4)
    # The old weights are let go with the last old row; the leaves are back to their own forward.
    mixed.filter(mixed.seqs[1:])
    assert mixed.mix is mix and mixed.old_rows == 2
    mixed.filter(mixed.seqs[2:])
    assert mixed.mix is None and mixed.old_rows == 0
    assert not any("forward" in vars(m) or "weight" in vars(m) for m in new.model.modules())


def test_versions_that_cannot_share_a_forward_are_not_paired(v0, tmp_path):  # noqa: F811
    old = load_model(v0, 0, CONFIG)
    other = AutoModelForCausalLM.from_pretrained(v0, num_hidden_layers=1)
    other.save_pretrained(tmp_path / "fewer-layers")
    AutoTokenizer.from_pretrained(v0).save_pretrained(tmp_path / "fewer-layers")
    assert MixedForward.pair(old, load_model(str(tmp_path / "fewer-layers"), 1, CONFIG)) is None
    other = AutoModelForCausalLM.from_pretrained(v0, rms_norm_eps=1e-2)  # same modules, another config
    other.save_pretrained(tmp_path / "other-eps")
    AutoTokenizer.from_pretrained(v0).save_pretrained(tmp_path / "other-eps")
    other_eps = load_model(str(tmp_path / "other-eps"), 1, CONFIG)
    assert other_eps.routable_modules == old.routable_modules and MixedForward.pair(old, other_eps) is None

    # A mixture of experts routes a gathered subset of the rows through each expert.
    tok = AutoTokenizer.from_pretrained(v0)
    cfg = MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=64,
    )  # fmt: skip
    for name, seed in (("moe-a", 0), ("moe-b", 1)):
        torch.manual_seed(seed)
        MixtralForCausalLM(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    a, b = (load_model(str(tmp_path / n), i, CONFIG) for i, n in enumerate(("moe-a", "moe-b")))
    assert a.routable_modules is None and MixedForward.pair(a, b) is None
    assert not any("forward" in vars(m) for m in b.model.modules())  # the probe cleaned up


def test_a_weighted_module_must_see_the_rows_first():
    lin_old, lin_new = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    forward = routed(lin_new, lin_old, 2, 5)
    x = torch.randn(5, 4)
    torch.testing.assert_close(forward(x), torch.cat([lin_old(x[:2]), lin_new(x[2:])]))
    with pytest.raises(NotRowwise, match=r"Linear got \(10, 4\) for a batch of 5 rows"):
        forward(torch.randn(10, 4))


def test_a_norm_takes_a_weight_per_row_other_modules_are_routed():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    assert scales_rows(norm) and "weight" not in vars(norm)  # the probe put the parameter back

    class Gate(torch.nn.Module):  # a 1-D weight used otherwise: a dot product per position
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    assert not scales_rows(Gate()) and not scales_rows(torch.nn.LayerNorm(8))  # LayerNorm: a bias too
