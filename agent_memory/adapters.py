"""LoRA delta files and their stacking.

Every bake trains one delta (a peft LoRA adapter). The adapter vLLM serves as `memory` is the SUM of
the live deltas, written as ONE plain peft adapter:

    delta_i(x) = s_i * B_i A_i x            (s_i = alpha_i / r_i)
    sum_i delta_i = [s_1 B_1 | s_2 B_2 | ...] @ [A_1; A_2; ...]      (concatenate along the rank)

so composition is exact, and "forget" is recomposing without a delta. The composed adapter has
lora_alpha == r (scale 1), no rsLoRA, no DoRA, no modules_to_save: what vLLM on CPU loads. When the
total rank passes vLLM's --max-lora-rank we compact each module with a truncated SVD of its summed
delta and report the relative error (Frobenius) per module.

Module names are peft's: "base_model.model.model.layers.3.self_attn.q_proj" -> we key on
"model.layers.3.self_attn.q_proj".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# No lm_head / embed_tokens: SmolLM2 ties them, and vLLM cannot serve LoRA on tied embeddings.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


# -- shapes of the base model's target modules --------------------------------------------------

def module_shapes(model_dir: Path, target_modules=TARGET_MODULES) -> dict[str, tuple[int, int]]:
    """{"model.layers.0.self_attn.q_proj": (in_features, out_features), ...} from config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    per_layer = {
        "self_attn.q_proj": (hidden, q_out), "self_attn.k_proj": (hidden, kv_out),
        "self_attn.v_proj": (hidden, kv_out), "self_attn.o_proj": (q_out, hidden),
        "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden),
    }
    shapes = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, shape in per_layer.items():
            if name.split(".")[-1] in target_modules:
                shapes[f"model.layers.{layer}.{name}"] = shape
    return shapes


# -- reading -------------------------------------------------------------------------------------

def read_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / CONFIG).read_text())


def read_delta(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A [r, in], B [out, r], scale)} in float32; the module's delta is scale * B @ A."""
    adapter_dir = Path(adapter_dir)
    cfg = read_config(adapter_dir)
    if cfg.get("use_dora"):
        raise ValueError(f"{adapter_dir}: DoRA adapters cannot be composed")
    tensors = load_file(str(adapter_dir / WEIGHTS))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = value.float()
    out = {}
    for module, ab in parts.items():
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        out[module] = (a, b, float(scale))
    return out


def _pattern_value(pattern: dict, module: str, default):
    for key, value in pattern.items():  # peft matches pattern keys as module-name suffixes
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def delta_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{module: scale * B @ A} [out, in]: the dense weight change an adapter makes."""
    return {m: s * (b @ a) for m, (a, b, s) in read_delta(adapter_dir).items()}


# -- writing -------------------------------------------------------------------------------------

def write_adapter(out_dir: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int,
                  alpha: float, base_model: str = "", extra_files: dict[str, str] | None = None) -> Path:
    """Write a plain peft LoRA adapter {module: (A [rank, in], B [out, rank])}, atomically.

    The files go to a temporary sibling directory that is renamed to `out_dir` at the end: a
    reader (vLLM, a kill -9) never sees a half-written adapter under the final name.
    """
    out_dir = Path(out_dir)
    tensors = {}
    for module, (a, b) in modules.items():
        assert a.shape[0] == rank and b.shape[1] == rank, (module, a.shape, b.shape, rank)
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.detach().float().contiguous()
    targets = sorted({m.split(".")[-1] for m in modules})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": targets, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def write_zero_adapter(model_dir: Path, out_dir: Path, rank: int = 8) -> Path:
    """A valid adapter whose delta is exactly zero (`base` is served as this; see serving.py)."""
    modules = {m: (torch.zeros(rank, fin), torch.zeros(fout, rank))
               for m, (fin, fout) in module_shapes(model_dir).items()}
    return write_adapter(out_dir, modules, rank=rank, alpha=rank, base_model=str(model_dir))


# -- composition ---------------------------------------------------------------------------------

def compose(delta_dirs: list[Path], out_dir: Path, max_rank: int) -> dict:
    """Write the sum of the deltas as one plain adapter (scale 1); compact by SVD past `max_rank`.

    Returns a report: {"rank", "total_rank", "compacted", "deltas", "max_rel_error",
    "rel_error" (per module, only when compacted)}.
    """
    if not delta_dirs:
        raise ValueError("compose needs at least one delta")
    deltas = [read_delta(d) for d in delta_dirs]
    modules = sorted(set().union(*deltas))
    ranks = [max((a.shape[0] for a, _, _ in d.values()), default=0) for d in deltas]
    total = sum(ranks)
    stacked = {}
    for module in modules:
        a_parts, b_parts = [], []
        for delta, r in zip(deltas, ranks):
            if module in delta:
                a, b, s = delta[module]
                a_parts.append(_pad_rows(a, r))
                b_parts.append(_pad_rows((b * s).T, r).T)  # the scale folded into B
            else:  # this delta does not touch the module: zeros keep every module at one rank
                shape = next(d[module] for d in deltas if module in d)
                a_parts.append(torch.zeros(r, shape[0].shape[1]))
                b_parts.append(torch.zeros(shape[1].shape[0], r))
        stacked[module] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
    report = {"deltas": [str(d) for d in delta_dirs], "total_rank": total, "compacted": False}
    rank = total
    if total > max_rank:
        rank = max_rank
        errors = {}
        for module, (a, b) in stacked.items():
            a2, b2, err = truncate(a, b, max_rank)
            stacked[module] = (a2, b2)
            errors[module] = round(err, 6)
        report.update(compacted=True, rel_error=errors, max_rel_error=max(errors.values(), default=0.0))
    else:
        report["max_rel_error"] = 0.0
    report["rank"] = rank
    base = read_config(delta_dirs[0]).get("base_model_name_or_path", "")
    write_adapter(out_dir, stacked, rank=rank, alpha=rank, base_model=base)
    return report


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, torch.zeros(rows - x.shape[0], *x.shape[1:])], 0)


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of B @ A (Eckart-Young) without forming the dense matrix.

    B = Qb Rb, A^T = Qa Ra  =>  B A = Qb (Rb Ra^T) Qa^T; the SVD of the small core gives the rest.
    Returns (A', B', relative Frobenius error of B' A' against B A).
    """
    a64, b64 = a.double(), b.double()
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    new_b = (qb @ u[:, :k]) * s[:k]
    new_a = vh[:k] @ qa.T
    if k < rank:  # fewer singular values than the budget: pad with zeros to the uniform rank
        new_a = torch.cat([new_a, new_a.new_zeros(rank - k, new_a.shape[1])])
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - k)], 1)
    total = float((s ** 2).sum())
    err = (float((s[k:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return new_a.float(), new_b.float(), err


def check_rank(adapter_dir: Path, max_rank: int) -> int:
    """The adapter's rank; raise ValueError if vLLM (--max-lora-rank) would refuse it."""
    r = int(read_config(adapter_dir)["r"])
    if r > max_rank:
        raise ValueError(f"{adapter_dir}: rank {r} > --max-lora-rank {max_rank}")
    return r


# -- applying a delta to a model in memory (the baking student's frozen live weights) --------------

@torch.no_grad()
def merge_into(model: torch.nn.Module, adapter_dir: Path, weight: float = 1.0) -> int:
    """Add an adapter's delta times `weight` into a transformers model's weights in place (-1 takes
    it out again); returns modules touched."""
    named = dict(model.named_modules())
    count = 0
    for module, (a, b, s) in read_delta(adapter_dir).items():
        layer = named.get(module)
        if layer is None:
            raise ValueError(f"{adapter_dir}: module {module} not in the model")
        w = layer.weight
        w.copy_((w.float() + weight * s * (b @ a)).to(w.dtype))
        count += 1
    return count


# -- a dense checkpoint with deltas merged in (what `memory` serves in merged mode) ----------------

@torch.no_grad()
def write_merged_checkpoint(model_dir: Path, delta_dirs: list[Path], out_dir: Path, dtype: str) -> Path:
    """The base checkpoint with the exact sum of the deltas added to its weights, stored in `dtype`
    (the dtype vLLM serves in), beside the base's config and tokenizer files; written atomically.

    Sharded checkpoints are merged shard by shard, so peak memory is one shard, not the model.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    torch_dtype = getattr(torch, dtype)
    changes: dict[str, torch.Tensor] = {}  # "model.layers.0.mlp.gate_proj.weight" -> summed delta (fp32)
    for delta_dir in delta_dirs:
        for module, weight in delta_weights(Path(delta_dir)).items():
            key = f"{module}.weight"
            changes[key] = changes[key] + weight if key in changes else weight
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for path in model_dir.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith("."):
                shutil.copy2(path, tmp / path.name)
        for shard in sorted(model_dir.glob("*.safetensors")):
            tensors = load_file(str(shard))
            for key, value in tensors.items():
                if key in changes:
                    value = value.float() + changes.pop(key)
                tensors[key] = value.to(torch_dtype) if value.is_floating_point() else value
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        if changes:
            raise ValueError(f"deltas name weights the checkpoint {model_dir} lacks: {sorted(changes)[:3]}")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
