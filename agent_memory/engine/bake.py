"""7. the bake: stages 1-6 in order, then delta + bake.json + probes.json saved into OUT.partial,
renamed to OUT at the very end.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import adapters
from ..hardware import idle_cores, matmul_gflops, pick_dtype
from ..probes import bake_entities
from . import PROBES_FILE
from .config import EngineConfig
from .probe import probe_candidate, probe_live
from .queries import build_queries, leak_check_queries
from .teacher import leaked_examples, preference_pairs, prompt_targets, teacher_examples
from .train import (add_lora, fold, load_live_model, lora_factors, make_batches, protect, protected_bases, train,
                    without_live)


@dataclass
class BakeResult:
    out_dir: Path
    report: dict


def bake(model_dir, live_adapter_dir, items: list[dict], out_dir, cfg: EngineConfig | None = None,
         progress=None, earlier: list[dict] = (), probe_plan: dict | None = None,
         live_cache: Path | None = None, live_version: str | None = None) -> BakeResult:
    """Train one delta for `items` on top of the live model; write it (peft + bake.json) to `out_dir`.
    `earlier`: items the live model was baked with, a few of which are replayed (replay_items()).
    `probe_plan`: the gate's questions (gate.probe_plan), answered into probes.json.

    Everything is written to `out_dir.partial` first and renamed at the end: a kill -9 leaves no
    delta under the final name.
    """
    cfg = cfg or EngineConfig()
    if cfg.teacher not in ("local", "vllm"):
        raise ValueError(f"teacher {cfg.teacher!r}: 'local' or 'vllm'")
    if cfg.update_teacher not in ("base", "live"):
        raise ValueError(f"update_teacher {cfg.update_teacher!r}: 'base' or 'live'")
    if cfg.student_scope not in ("updates", "all"):
        raise ValueError(f"student_scope {cfg.student_scope!r}: 'updates' or 'all'")
    if not 0 <= cfg.protect < 1:
        raise ValueError(f"protect {cfg.protect!r}: a share of the anchors' input energy, 0 (off) to below 1")
    if cfg.init not in ("default", "eva", "contrast"):
        raise ValueError(f"init {cfg.init!r}: 'default', 'eva' or 'contrast'")
    if cfg.contrast_eps <= 0:
        raise ValueError(f"contrast_eps {cfg.contrast_eps!r}: above 0")
    if cfg.hidden_scope not in ("all", "anchors"):
        raise ValueError(f"hidden_scope {cfg.hidden_scope!r}: 'all' or 'anchors'")
    if cfg.anchor_prompts < 0:
        raise ValueError(f"anchor_prompts {cfg.anchor_prompts!r}: a weight per prompt token, 0 (off) or more")
    if cfg.unlearn_weight < 0 or cfg.unlearn_beta <= 0:
        raise ValueError(f"unlearn_weight {cfg.unlearn_weight!r} (0 = off, or more), unlearn_beta {cfg.unlearn_beta!r} (above 0)")
    if cfg.unlearn_from not in ("given", "own", "both"):
        raise ValueError(f"unlearn_from {cfg.unlearn_from!r}: 'given', 'own' or 'both'")
    if cfg.compile_from_steps < 0:
        raise ValueError(f"compile_from_steps {cfg.compile_from_steps!r}: 0 (never) or a number of steps")
    if cfg.leak_checks < 0 or cfg.leak_questions < 0:
        raise ValueError(f"leak_checks {cfg.leak_checks!r}, leak_questions {cfg.leak_questions!r}: 0 (off) or more")
    if not items:
        raise ValueError("nothing to bake")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    timings, t0 = {}, time.monotonic()
    torch.set_num_threads(cfg.threads or idle_cores())
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    dtype = pick_dtype(cfg.dtype)

    model, tokenizer = load_live_model(model_dir, live_adapter_dir, dtype)
    timings["load_s"] = time.monotonic() - t0

    t = time.monotonic()
    live_answers, teacher_answers = probe_live(model, tokenizer, probe_plan, Path(live_cache) if live_cache else None,
                                               items, cfg.memory_style) if probe_plan else (None, None)
    timings["probe_live_s"] = time.monotonic() - t

    t = time.monotonic()
    queries = build_queries(items, cfg, rng, earlier)
    examples = teacher_examples(model, tokenizer, queries, cfg, progress,
                                unbaked=lambda: without_live(model, live_adapter_dir))
    if cfg.anchor_prompts:
        examples = prompt_targets(model, examples, cfg)
    pairs = preference_pairs(model, tokenizer, queries, cfg, examples)
    timings["teacher_s"] = time.monotonic() - t
    answer_tokens = sum(len(e.answer_ids) for e in examples)
    if not examples:
        raise RuntimeError("the teacher produced no answers to train on")

    t = time.monotonic()
    _release_freed_memory()  # the teacher's caches and logits
    bases = protected_bases(model, examples, cfg) if cfg.protect else {}
    peft_model = add_lora(model, cfg, examples, tokenizer.pad_token_id)
    _release_freed_memory()  # the input moments of the contrastive init
    protected = protect(peft_model, bases)
    batches = make_batches(examples, cfg.batch_size, tokenizer.pad_token_id, anchor_weight=cfg.anchor_weight,
                           prompt_weight=cfg.anchor_prompts)
    for e in examples:
        e.hidden = None  # the batches hold the teacher's hidden states now: one copy in the trainer, not two
    anchors, names = [q for q in queries if q.kind == "anchor"], bake_entities(items)

    def leak_check():  # the student's answers to the anchors that name the bake, the live model their teacher
        asked = anchors + leak_check_queries(cfg.leak_questions, rng)
        found = leaked_examples(peft_model, tokenizer, asked, names, cfg)
        return make_batches(found, cfg.batch_size, tokenizer.pad_token_id, anchor_weight=cfg.anchor_weight) if found else []

    report = train(peft_model, batches, cfg, progress, items=len(items), pairs=pairs,
                   leak_check=leak_check if anchors and names else None)
    fold(protected)
    timings["train_s"] = time.monotonic() - t

    t = time.monotonic()
    answers = {"candidate": probe_candidate(peft_model, tokenizer, probe_plan, progress), "live": live_answers,
               "teacher": teacher_answers} if probe_plan else None
    timings["probe_s"] = time.monotonic() - t + timings["probe_live_s"]

    flops = report.pop("train_flops")
    peak = matmul_gflops(dtype, on=model.device)
    achieved = flops / report["train_seconds"] / 1e9 if report["train_seconds"] else 0.0

    new_ids = {i.get("id") for i in items}
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    timings["total_s"] = time.monotonic() - t0
    summary = {
        "items": items, "config": {**asdict(cfg), "teacher_api_key": ""}, "seed": cfg.seed,
        "live_version": live_version,  # the delta is a change of this version (bakery re-uses it only there)
        "queries": [{"question": q.question, "kind": q.kind, "item": q.item_id} for q in queries],
        "replayed": sorted({q.item_id for q in queries if q.item_id not in new_ids} - {None}, key=str),
        "examples": len(examples), "answer_tokens": answer_tokens, "preference_pairs": len(pairs),
        "teacher_samples": [tokenizer.decode(e.answer_ids, skip_special_tokens=True)
                            for e in examples[:: max(1, len(examples) // 12)]],
        **{k: v for k, v in report.items()},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "train_gflops_per_s": round(achieved, 1), "matmul_gflops_per_s": round(peak, 1), "dtype": str(dtype).removeprefix("torch."),
        "flops_share": round(achieved / peak, 3) if peak else None,
    }
    files = {"bake.json": json.dumps(summary, indent=2, default=str)}
    if answers is not None:
        files[PROBES_FILE] = json.dumps(answers)
    adapters.write_adapter(partial, lora_factors(peft_model), rank=cfg.rank, alpha=cfg.alpha,
                           base_model=str(model_dir), extra_files=files)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(partial, out_dir)  # the only moment the delta appears under its final name
    return BakeResult(out_dir, summary)


def _release_freed_memory() -> None:
    """Hand the pages of freed tensors back to the OS between stages (glibc keeps a freed heap
    block's pages, and the next stage's tensors, of other sizes, do not reuse them all), so the
    training's peak starts from what is alive. A no-op where libc has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
