"""LoRA deltas: exact composition, bounded compaction, exact forget, loadable by peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agent_memory import adapters

MODULES = {  # module -> (in, out), like two layers of a small Llama
    f"model.layers.{i}.{name}": shape
    for i in range(2)
    for name, shape in (("self_attn.q_proj", (16, 16)), ("self_attn.v_proj", (16, 8)), ("mlp.down_proj", (24, 16)))
}


def random_delta(path: Path, rank: int, alpha: float, seed: int, rslora: bool = False) -> Path:
    g = torch.Generator().manual_seed(seed)
    modules = {m: (torch.randn(rank, fin, generator=g), torch.randn(fout, rank, generator=g))
               for m, (fin, fout) in MODULES.items()}
    adapters.write_adapter(path, modules, rank=rank, alpha=alpha)
    if rslora:  # write_adapter only writes plain adapters; flip the flag as peft would have it
        cfg = json.loads((path / adapters.CONFIG).read_text())
        cfg["use_rslora"] = True
        (path / adapters.CONFIG).write_text(json.dumps(cfg))
    return path


def dense(path: Path) -> dict[str, torch.Tensor]:
    return adapters.delta_weights(path)


def test_read_delta_scale_follows_alpha_and_rslora(tmp_path):
    plain = adapters.read_delta(random_delta(tmp_path / "p", rank=4, alpha=8, seed=0))
    rs = adapters.read_delta(random_delta(tmp_path / "r", rank=4, alpha=8, seed=0, rslora=True))
    assert {s for _, _, s in plain.values()} == {2.0}
    assert {s for _, _, s in rs.values()} == {4.0}


def test_compose_equals_sum_of_deltas(tmp_path):
    d1 = random_delta(tmp_path / "d1", rank=4, alpha=8, seed=1)
    d2 = random_delta(tmp_path / "d2", rank=8, alpha=1, seed=2)
    d3 = random_delta(tmp_path / "d3", rank=2, alpha=3, seed=3, rslora=True)
    report = adapters.compose([d1, d2, d3], tmp_path / "live", max_rank=64)
    cfg = adapters.read_config(tmp_path / "live")
    assert report["rank"] == cfg["r"] == cfg["lora_alpha"] == 14 and not report["compacted"]
    assert not cfg["use_rslora"] and not cfg["use_dora"] and not cfg["modules_to_save"]
    live, parts = dense(tmp_path / "live"), [dense(d) for d in (d1, d2, d3)]
    for module in MODULES:
        expected = sum(p[module] for p in parts)
        torch.testing.assert_close(live[module], expected, rtol=1e-5, atol=1e-4)


def test_forget_recompose_without_a_delta_removes_it_exactly(tmp_path):
    d1 = random_delta(tmp_path / "d1", rank=4, alpha=4, seed=1)
    d2 = random_delta(tmp_path / "d2", rank=4, alpha=16, seed=2)
    adapters.compose([d1, d2], tmp_path / "both", max_rank=64)
    adapters.compose([d1], tmp_path / "forgot", max_rank=64)
    both, forgot, only1, only2 = (dense(tmp_path / "both"), dense(tmp_path / "forgot"), dense(d1), dense(d2))
    for module in MODULES:
        assert torch.equal(forgot[module], only1[module])  # bit-exact: the same factors, scale 1
        torch.testing.assert_close(both[module] - forgot[module], only2[module], rtol=1e-5, atol=1e-4)


def test_compaction_fits_the_budget_and_reports_the_true_error(tmp_path):
    deltas = [random_delta(tmp_path / f"d{i}", rank=8, alpha=8, seed=i) for i in range(3)]  # total 24
    report = adapters.compose(deltas, tmp_path / "live", max_rank=16)
    assert report["compacted"] and report["rank"] == 16 == adapters.read_config(tmp_path / "live")["r"]
    live, parts = dense(tmp_path / "live"), [dense(d) for d in deltas]
    for module in MODULES:
        exact = sum(p[module] for p in parts)
        err = float((live[module] - exact).norm() / exact.norm())
        assert err == pytest.approx(report["rel_error"][module], abs=1e-4)
        # Eckart-Young: no rank-16 matrix is closer than the SVD truncation
        s = torch.linalg.svdvals(exact.double())
        optimal = float((s[16:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert err == pytest.approx(optimal, abs=1e-4)
    assert 0 <= report["max_rel_error"] < 1


def test_compaction_is_lossless_when_the_sum_has_low_rank(tmp_path):
    d1 = random_delta(tmp_path / "d1", rank=8, alpha=8, seed=1)
    # Same factors with B negated: a delta that cancels d1 -> the sum has rank 0
    a_b = adapters.read_delta(d1)
    adapters.write_adapter(tmp_path / "neg", {m: (a, -b) for m, (a, b, _) in a_b.items()}, rank=8, alpha=8)
    d3 = random_delta(tmp_path / "d3", rank=8, alpha=8, seed=3)
    report = adapters.compose([d1, tmp_path / "neg", d3], tmp_path / "live", max_rank=8)
    assert report["compacted"] and report["max_rel_error"] < 1e-4
    live, target = dense(tmp_path / "live"), dense(d3)
    for module in MODULES:
        torch.testing.assert_close(live[module], target[module], rtol=1e-4, atol=1e-3)


def test_write_is_atomic_and_replaces(tmp_path):
    out = tmp_path / "live"
    adapters.compose([random_delta(tmp_path / "d1", 4, 4, 1)], out, max_rank=8)
    adapters.compose([random_delta(tmp_path / "d2", 4, 4, 2)], out, max_rank=8)
    torch.testing.assert_close(dense(out)[next(iter(MODULES))], dense(tmp_path / "d2")[next(iter(MODULES))])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_check_rank(tmp_path):
    d = random_delta(tmp_path / "d", rank=16, alpha=16, seed=0)
    assert adapters.check_rank(d, 16) == 16
    with pytest.raises(ValueError):
        adapters.check_rank(d, 8)


# -- against real peft on a tiny Llama ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _logits(model_dir: Path, adapter: Path | None, merge: list[Path] = ()) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for d in merge:
        adapters.merge_into(model, d)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.arange(10)[None] % 64
    with torch.no_grad():
        return model(ids).logits


def _peft_delta(model_dir: Path, out: Path, seed: int, rank: int, alpha: float) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=adapters.TARGET_MODULES))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(out)
    return out


def test_zero_adapter_is_exactly_the_base_model(tiny_model_dir, tmp_path):
    zero = adapters.write_zero_adapter(tiny_model_dir, tmp_path / "zero", rank=8)
    shapes = adapters.module_shapes(tiny_model_dir)
    delta = adapters.read_delta(zero)
    assert set(delta) == set(shapes) and len(shapes) == 2 * 7
    assert all(float(b.abs().max()) == 0 for _, b, _ in delta.values())
    assert torch.equal(_logits(tiny_model_dir, zero), _logits(tiny_model_dir, None))


def test_composed_adapter_in_peft_equals_both_deltas_applied(tiny_model_dir, tmp_path):
    d1 = _peft_delta(tiny_model_dir, tmp_path / "d1", seed=1, rank=4, alpha=8)
    d2 = _peft_delta(tiny_model_dir, tmp_path / "d2", seed=2, rank=8, alpha=1)
    adapters.compose([d1, d2], tmp_path / "live", max_rank=16)
    via_peft = _logits(tiny_model_dir, tmp_path / "live")
    merged = _logits(tiny_model_dir, None, merge=[d1, d2])
    base = _logits(tiny_model_dir, None)
    assert not torch.allclose(merged, base, atol=1e-3)  # the deltas do something
    torch.testing.assert_close(via_peft, merged, rtol=1e-4, atol=1e-4)
