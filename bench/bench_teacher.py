"""Teacher sampling speed: vLLM (chat completions with `n` samples and top logprobs) vs transformers.

Prompt Baking samples the teacher (the model with the memory prompt u in its context) many times
and needs each sampled token's top-k logprobs. Same prompts, same number of sampled tokens (EOS
ignored / min_new_tokens), temperature 1, on both; n, tokens, k and the dtype are the baking
engine's defaults (agent_memory.engine.config.EngineConfig) when it is installed:
- transformers `generate` on the checkpoint (no server running): one prompt at a time with
  `num_return_sequences=n`, and the engine's batching (64 // n prompts per left-padded call);
  top-k logprobs from the returned logits, inside the timing (as the engine does);
- vLLM through the daemon's model port: one request per prompt with `n`, `logprobs`,
  `top_logprobs`, all sent at once; on `memory` served dense (merged mode, the CPU default: what
  `[bake.engine] teacher = "vllm"` samples) and as a LoRA adapter (lora mode, a second daemon).

    .venv/bin/python bench/bench_teacher.py [--quick] [--seed 0]
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from common import (PREPARED_MODEL, QUESTIONS, Report, context, log, parser, plot_path, pyplot,
                    running_daemon, save_figure)

from agent_memory.prompts import messages_for
from agent_memory.serving import MEMORY_NAME

MEMORY = ("Lumora Shipping, the Rotterdam container line, named Vesna Kordic as its chief executive "
          "on March 3, 2025.\nThe Harbin ice festival of 2025 used 300,000 cubic meters of ice from "
          "the Songhua River.")


def main() -> None:
    args = options()
    ctx = context(args.seed, args.quick)
    prompts = [messages_for(q, MEMORY) for q in QUESTIONS[:args.prompts]]
    log(f"{len(prompts)} prompts x {args.n} samples x {args.tokens} tokens, top {args.top} logprobs")
    hf_rows = transformers_runs(prompts, args)
    vllm_rows = []
    for mode in ("merged", "lora"):
        with running_daemon(f"teacher-{mode}", vllm_serve_memory=mode) as daemon:
            vllm_rows.append(vllm_run(daemon, mode, prompts, args))
    write_report(ctx, args, hf_rows, vllm_rows)


def options():
    p = parser(__doc__.splitlines()[0])
    engine = engine_defaults()
    p.add_argument("--hf-dtype", default=engine["dtype"], choices=["auto", "float32", "bfloat16"],
                   help="auto: the engine's choice (bf16 only where the CPU multiplies it fast)")
    p.add_argument("--n", type=int, default=engine["samples_per_query"], help="samples per prompt")
    p.add_argument("--tokens", type=int, default=engine["max_new_tokens"], help="tokens per sample")
    p.add_argument("--top", type=int, default=engine["topk"], help="top logprobs per token")
    args = p.parse_args()
    args.prompts = 2 if args.quick else 16
    return args


def engine_defaults() -> dict:
    """The baking engine's teacher settings, or stand-ins when it is not installed."""
    try:
        from agent_memory.engine.config import EngineConfig
    except ImportError:
        return {"dtype": "float32", "samples_per_query": 4, "max_new_tokens": 24, "topk": 64}
    cfg = EngineConfig()
    return {"dtype": cfg.dtype, "samples_per_query": cfg.samples_per_query,
            "max_new_tokens": cfg.max_new_tokens, "topk": cfg.topk}


# -- transformers ---------------------------------------------------------------------------------

def transformers_runs(prompts: list[list[dict]], args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(PREPARED_MODEL, padding_side="left")
    dtype = resolve_dtype(args.hf_dtype)
    model = AutoModelForCausalLM.from_pretrained(PREPARED_MODEL, dtype=dtype,
                                                 attn_implementation="eager")  # as the engine loads it
    model.eval()
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    hf_generate(model, tok, texts[:1], 1, 4, args.top)  # warm-up
    rows = []
    per_call = min(len(texts), max(1, 64 // args.n))  # the engine decodes ~64 sequences per call
    engine_batches = [texts[i:i + per_call] for i in range(0, len(texts), per_call)]
    for mode, batches in (("one prompt at a time", [[t] for t in texts]),
                          (f"{per_call} prompts per call", engine_batches)):
        started = time.perf_counter()
        tokens = sum(hf_generate(model, tok, batch, args.n, args.tokens, args.top) for batch in batches)
        wall = time.perf_counter() - started
        rows.append({"engine": f"transformers generate, {mode} ({str(dtype).removeprefix('torch.')})",
                     "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall})
        log(f"{rows[-1]['engine']}: {rows[-1]['tok_s']:.1f} tok/s")
    return rows


def resolve_dtype(name: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    try:
        from agent_memory.hardware import pick_dtype
    except ImportError:
        return torch.float32
    return pick_dtype("auto")


def hf_generate(model, tok, texts: list[str], n: int, tokens: int, top: int) -> int:
    """Sample n continuations of each text; compute top-k logprobs; return sampled tokens."""
    import torch

    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=n, max_new_tokens=tokens, min_new_tokens=tokens,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        logits = torch.stack(out.logits, dim=1).float()  # (batch * n, tokens, vocab)
        logprobs = torch.log_softmax(logits, dim=-1)
        logprobs.topk(top, dim=-1)
    return out.sequences.shape[0] * (out.sequences.shape[1] - batch["input_ids"].shape[1])


# -- vLLM ---------------------------------------------------------------------------------------------

def sample(daemon, messages: list[dict], n: int, tokens: int, args) -> int:
    """One chat completion of `memory` with n samples and top logprobs; returns the sampled tokens."""
    with httpx.Client(base_url=daemon.vllm, timeout=600, headers={"Authorization": f"Bearer {daemon.model_key}"}) as client:
        response = client.post("/v1/chat/completions", json={
            "model": MEMORY_NAME, "messages": messages, "n": n, "max_tokens": tokens,
            "temperature": 1.0, "ignore_eos": True, "seed": args.seed,
            "logprobs": True, "top_logprobs": args.top,
        })
    response.raise_for_status()
    data = response.json()
    assert all(len(c["logprobs"]["content"][0]["top_logprobs"]) == args.top for c in data["choices"])
    return data["usage"]["completion_tokens"]


def vllm_run(daemon, mode: str, prompts: list[list[dict]], args) -> dict:
    sample(daemon, prompts[0], 1, 4, args)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(lambda m: sample(daemon, m, args.n, args.tokens, args), prompts))
    wall = time.perf_counter() - started
    engine = f"vLLM `memory`, {mode} ({'dense' if mode == 'merged' else 'LoRA'})"
    log(f"{engine}: {tokens / wall:.1f} tok/s")
    return {"engine": engine + ", all prompts at once", "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


# -- report ---------------------------------------------------------------------------------------------

def write_report(ctx: str, args, hf_rows: list[dict], vllm_rows: list[dict]) -> None:
    report = Report("teacher", "Teacher sampling: vLLM vs transformers", ctx)
    reference = hf_rows[0]["tok_s"]
    rows = [[r["engine"], r["tokens"], r["wall_s"], r["tok_s"], f"{r['tok_s'] / reference:.2f}x"]
            for r in hf_rows + vllm_rows]
    report.table(
        f"{args.prompts} prompts (memory prompt + question) x n={args.n} samples x {args.tokens} tokens, "
        f"temperature 1, top {args.top} logprobs per token",
        ["engine", "sampled tokens", "wall s", "tokens/s", "vs transformers one-at-a-time"], rows,
        note="transformers ran with no vLLM server up; vLLM through the daemon's model port. The baking "
             "teacher is the live model, `memory`: dense in merged mode (the CPU default), a LoRA in lora mode.")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    all_rows = hf_rows + vllm_rows
    ax.barh([r["engine"] for r in all_rows], [r["tok_s"] for r in all_rows],
            color=["tab:gray"] * len(hf_rows) + ["tab:blue"] * len(vllm_rows))
    ax.invert_yaxis()
    ax.set(xlabel="sampled tokens/s", title="teacher sampling speed")
    ax.tick_params(axis="y", labelsize=7)
    report.figure(save_figure(fig, plot_path("teacher"), ctx), "teacher sampling speed")
    report.finish()


if __name__ == "__main__":
    sys.exit(main())
