"""2. teacher: sampled answers + the teacher's distribution at each answer token.

Sample answers from the live model prompted with the item (u), the first greedy, here or from the
daemon's vLLM; keep the on-topic ones and the teacher's top-k distribution at every answer token.
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from ..probes import REMOTE_CONCURRENCY, is_correct
from .config import EngineConfig
from .queries import RECITE_MAX_TOKENS, Query


@dataclass
class Example:
    prompt_ids: list[int]  # the STUDENT's context: chat template of the bare question
    answer_ids: list[int]  # sampled answer, its end-of-turn token included when it ended
    top_idx: torch.Tensor  # [T, k] teacher's top-k token ids at each answer position
    top_logp: torch.Tensor  # [T, k] their log-probabilities (at temperature 1)
    kind: str
    # An anchor's prompt tokens as targets too (prompt_targets): the live model's top-k at prompt
    # positions 0 .. len(prompt_ids) - 2, each predicting the next prompt token.
    prompt_top_idx: torch.Tensor | None = None
    prompt_top_logp: torch.Tensor | None = None
    # [T, layers, d]: the teacher's hidden states at the answer positions, at matched_layers()
    # (cfg.hidden_weight; None when off, when the teacher was vLLM, or for an item's answer with
    # cfg.hidden_scope "anchors").
    hidden: torch.Tensor | None = None
    query: int | None = None  # id() of the Query it answers
    own: bool = False  # written by the student (on-policy), not by the teacher


@dataclass
class Pair:
    """An update's preference pair (cfg.unlearn_weight): to the bare question, its own words (chosen)
    over the earlier report's (rejected); ref_margin: the live model's log-likelihood of the chosen
    answer minus the rejected one's, the reference DPO measures the student's margin from."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_margin: float


def matched_layers(num_layers: int, cfg: EngineConfig) -> list[int]:
    """The layers whose outputs the student is taught to match (cfg.hidden_layers of them, evenly
    spaced, the last included), as indices into transformers' hidden_states (0 = the embeddings)."""
    if not cfg.hidden_weight:
        return []
    k = min(cfg.hidden_layers, num_layers)
    return [round(num_layers * (i + 1) / k) for i in range(k)]


def keeps_states(q: Query, cfg: EngineConfig) -> bool:
    """Whether the student is taught to match the teacher's hidden states on answers to `q`:
    cfg.hidden_weight is on and cfg.hidden_scope takes `q`'s kind."""
    return bool(cfg.hidden_weight) and (cfg.hidden_scope == "all" or q.kind == "anchor")


def states_cfg(queries, cfg: EngineConfig) -> EngineConfig:
    """cfg for one teacher pass over `queries`: hidden states off when none of them keeps any, so
    no states are computed only to be dropped."""
    return cfg if any(keeps_states(q, cfg) for q in queries) else replace(cfg, hidden_weight=0.0)


def matched_states(q: Query, hidden: torch.Tensor | None, cfg: EngineConfig, length: int | None = None):
    """The teacher's hidden states the student is taught to match on an answer to `q` (its first
    `length` tokens' copy), or None: none were kept, or cfg.hidden_scope leaves `q`'s kind out."""
    if hidden is None or not keeps_states(q, cfg):
        return None
    return hidden if length is None else hidden[:length].clone()


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def student_ids(tokenizer, question: str) -> list[int]:
    """The student's context: the bare question, as users send it (no memory, no system prompt)."""
    return chat_ids(tokenizer, [{"role": "user", "content": question}])


def right_padded(seqs: list[list[int]], on) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `seqs` padded on the right to the longest."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=on)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=on)
    return ids, mask


SAMPLE_BATCH = 48  # sequences the local teacher decodes together (96 and 192 were no faster here)


@torch.no_grad()
def teacher_examples(model, tokenizer, queries: list[Query], cfg: EngineConfig, progress=None,
                     unbaked=None) -> list[Example]:
    """Sample answers from the prompted live model, with its top-k log-probs at each answer token.

    cfg.teacher "local": this process's copy of the live model (local_samples); "vllm": the live
    model as the daemon serves it (`memory` on cfg.teacher_url, remote_samples). Either way the
    samples then pass the same filter (keep_samples). An update's queries (q.strict) are answered
    by the model before the live delta when cfg.update_teacher is "base": `unbaked()` makes `model`
    so for a while (train.without_live), and vLLM's cfg.teacher_base_model samples them.
    With cfg.student_samples, the student's own answers (student_answers) are scored by the same
    teachers as their queries and kept whatever they say: on-policy distillation.
    """
    updates = [q for q in queries if q.strict] if cfg.update_teacher == "base" and unbaked else []
    passes = [([q for q in queries if not q.strict] if updates else queries, nullcontext, cfg),
              (updates, unbaked, replace(cfg, teacher_model=cfg.teacher_base_model))]
    own = student_answers(model, tokenizer, queries, cfg)  # before any pass: the student is the live model
    examples: list[Example] = []
    done = 0
    for group, state, pass_cfg in passes:
        if not group:
            continue
        with state():
            given = [(q, given_ids(tokenizer, q.answer)) for q in group if q.answer is not None]
            sampled = [q for q in group if q.answer is None]
            source = remote_samples(tokenizer, sampled, pass_cfg) if cfg.teacher == "vllm" else \
                local_samples(model, tokenizer, sampled, pass_cfg)
            for q, samples in itertools.chain(scored_answers(model, tokenizer, given, pass_cfg), source):
                examples += keep_samples(tokenizer, q, samples, pass_cfg)
                done += 1
                if progress:
                    progress("teacher", done, len(queries))
            # The student's own answers, scored by this pass's teacher: all kept, the stale or
            # off-topic ones most of all (they are what the KL must correct).
            mine = [(q, a) for q in group for a in own.get(id(q), [])]
            for q, [(a, top_idx, top_logp, hidden)] in scored_answers(model, tokenizer, mine, pass_cfg):
                if len(a) > 1:
                    examples.append(Example(student_ids(tokenizer, q.question), a, top_idx, top_logp, q.kind,
                                            hidden=matched_states(q, hidden, cfg), query=id(q), own=True))
    return examples


def student_answers(model, tokenizer, queries: list[Query], cfg: EngineConfig) -> dict[int, list[list[int]]]:
    """{id(query): cfg.student_samples answers} written by the student before training (the live
    model, asked the bare question as users ask it; the first greedy), for on-policy distillation:
    the item queries of cfg.student_scope, not the given-answer or recitation ones."""
    if not cfg.student_samples:
        return {}
    picked = [q for q in queries if q.kind == "knowledge" and q.answer is None and not q.max_new_tokens
              and (cfg.student_scope == "all" or q.strict)]
    bare = [replace(q, context=None, samples=cfg.student_samples) for q in picked]  # asked as users ask
    original = {id(b): q for b, q in zip(bare, picked)}
    return {id(original[id(b)]): [answer for answer, *_ in samples]
            for b, samples in local_samples(model, tokenizer, bare, replace(cfg, hidden_weight=0.0))}  # answers only


@torch.no_grad()
def preference_pairs(model, tokenizer, queries: list[Query], cfg: EngineConfig,
                     examples: list[Example] = ()) -> list[Pair]:
    """An update's preference pairs, asked as users ask (the bare question), each with its reference
    margin from `model` (the live model: the student before training); none when cfg.unlearn_weight
    is 0. cfg.unlearn_from "given": per given-answer query (q.stale), the update's words over the
    earlier report's; "own": per sampled update query, the teacher's first kept answer (it names
    what is new) over each of the student's own answers that does not (`examples`' on-policy ones);
    "both"."""
    if not cfg.unlearn_weight:
        return []
    answers: dict[int, list[Example]] = {}
    for e in examples:
        answers.setdefault(e.query, []).append(e)
    pairs = []
    for q in queries:
        rivals = []
        if q.stale and q.answer and cfg.unlearn_from in ("given", "both"):
            rivals.append((given_ids(tokenizer, q.answer), given_ids(tokenizer, q.stale)))
        if q.strict and q.answer is None and cfg.unlearn_from in ("own", "both"):
            theirs = [e for e in answers.get(id(q), []) if not e.own]
            missed = [e for e in answers.get(id(q), []) if e.own
                      and not is_correct(tokenizer.decode(e.answer_ids, skip_special_tokens=True), q.keywords)]
            rivals += [(theirs[0].answer_ids, e.answer_ids) for e in missed if theirs]
        prompt = student_ids(tokenizer, q.question) if rivals else None
        for chosen, rejected in rivals:
            logp = sequence_logps(model, prompt, [chosen, rejected])
            pairs.append(Pair(prompt, chosen, rejected, float(logp[0] - logp[1])))
    return pairs


@torch.no_grad()
def leaked_examples(peft_model, tokenizer, anchors: list[Query], names: list[str], cfg: EngineConfig) -> list[Example]:
    """The student's greedy answers (the delta as trained so far) to the `anchors` that name one of
    `names` (the bake's entities) the question does not, each scored token by token by the live
    model (the delta switched off): on-policy distillation where the delta leaks (cfg.leak_checks).
    The KL then pushes down the whole baked name, every token of it, toward what the live model
    would say there; a penalty on a name's first token alone would hit ordinary words (most made-up
    names start with one letter or a common piece)."""
    inner = peft_model.base_model.model  # the LlamaForCausalLM, LoRA layers injected
    greedy = replace(cfg, temperature=0.0, greedy_first=False, hidden_weight=0.0)
    training = peft_model.training
    peft_model.eval()
    leaked = []
    try:
        for start in range(0, len(anchors), SAMPLE_BATCH):
            chunk = anchors[start:start + SAMPLE_BATCH]
            answers, *_ = sample(inner, [student_ids(tokenizer, q.question) for q in chunk], 1, greedy,
                                 tokenizer.eos_token_id, cfg.anchor_max_tokens)
            for q, a in zip(chunk, answers):
                others = [n for n in names if n.lower() not in q.question.lower()]
                if len(a) > 1 and is_correct(tokenizer.decode(a, skip_special_tokens=True), others):
                    leaked.append((q, a))
        with peft_model.disable_adapter():  # the live model: an anchor's teacher
            scored = list(scored_answers(inner, tokenizer, leaked, greedy))
    finally:
        peft_model.train(training)
    return [Example(student_ids(tokenizer, q.question), a, top_idx, top_logp, q.kind, query=id(q), own=True)
            for q, [(a, top_idx, top_logp, _)] in scored]


def sequence_logps(model, prompt: list[int], answers: list[list[int]]) -> torch.Tensor:
    """[len(answers)]: log P(answer | prompt) of each answer under `model` (a causal LM, peft or not),
    summed over its tokens. One right-padded forward pass; gradients flow when enabled."""
    ids, mask = right_padded([prompt + a[:-1] for a in answers], model.device)  # the last token is only a target
    start = len(prompt) - 1  # the logits there predict answer token 0; the LM head runs from there on
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - start).logits
    return torch.stack([logits[b, :len(a)].float().log_softmax(-1)
                        .gather(-1, torch.tensor(a, device=ids.device)[:, None]).sum() for b, a in enumerate(answers)])


def keep_samples(tokenizer, q: Query, samples: list[tuple], cfg: EngineConfig) -> list[Example]:
    """One query's samples (answer ids, top_idx, top_logp, hidden) as training examples, minus the useless ones."""
    texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer, *_ in samples]
    on_topic = [not (cfg.on_topic_only and q.keywords) or is_correct(t, q.keywords) for t in texts]
    student_prompt = student_ids(tokenizer, q.question)
    examples = []
    for (answer, top_idx, top_logp, hidden), keep in zip(samples, on_topic):
        if len(answer) <= 1 and q.kind != "anchor":
            continue  # an empty answer teaches nothing about u
        if not keep and (any(on_topic) or q.strict):
            continue  # off topic while a sibling sample is on it (or at all, for a strict query)
        examples.append(Example(student_prompt, answer, top_idx[:len(answer)].clone(), top_logp[:len(answer)].clone(),
                                q.kind, hidden=matched_states(q, hidden, cfg, len(answer)), query=id(q)))
    return examples


def local_samples(model, tokenizer, queries: list[Query], cfg: EngineConfig):
    """Yield (query, its samples) from the local live model.

    Our own sampling loop instead of generate(num_return_sequences=n): each teacher prompt (u + q,
    ~100 tokens) is prefilled ONCE and its KV cache copied n times, where generate would prefill it
    n times (the prefill was most of the teacher's time). The logits we sample from are the
    teacher's distribution, so keeping their top-k costs no second forward pass. Position 0 is the
    first answer token: kept.
    """
    per_batch = max(1, SAMPLE_BATCH // cfg.samples_per_query)
    for start in range(0, len(queries), per_batch):
        chunk = queries[start:start + per_batch]
        for (n, max_new_tokens), group in _by_samples(chunk, cfg):
            prompts = [chat_ids(tokenizer, q.messages) for q in group]
            answers, top_idx, top_logp, hidden = sample(model, prompts, n, states_cfg(group, cfg), tokenizer.eos_token_id,
                                                        max_new_tokens)
            for i, q in enumerate(group):
                rows = range(i * n, (i + 1) * n)
                yield q, [(answers[r], top_idx[r], top_logp[r], None if hidden is None else hidden[r]) for r in rows]


@torch.no_grad()
def prompt_targets(model, examples: list[Example], cfg: EngineConfig) -> list[Example]:
    """The examples, each anchor with the live model's top-k at its prompt tokens (cfg.anchor_prompts):
    the KL then holds the model on the whole of an unrelated question, its own words included, not
    only on the tokens of its answer. `model` must be the live model, an anchor's teacher."""
    anchors = [e for e in examples if e.kind == "anchor"]
    scored = {}
    for start in range(0, len(anchors), SAMPLE_BATCH):
        chunk = anchors[start:start + SAMPLE_BATCH]
        tops = topk_at(model, [e.prompt_ids for e in chunk], [(0, len(e.prompt_ids) - 1) for e in chunk], cfg.topk)
        for e, (top_idx, top_logp, _) in zip(chunk, tops):
            scored[id(e)] = replace(e, prompt_top_idx=top_idx, prompt_top_logp=top_logp)
    return [scored.get(id(e), e) for e in examples]


def given_ids(tokenizer, text: str) -> list[int]:
    """A given answer's tokens: its first RECITE_MAX_TOKENS, or all of them and the end of turn."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:RECITE_MAX_TOKENS] if len(ids) >= RECITE_MAX_TOKENS else ids + [tokenizer.eos_token_id]


@torch.no_grad()
def scored_answers(model, tokenizer, pairs: list[tuple[Query, list[int]]], cfg: EngineConfig):
    """Yield (query, [its answer]) for each (query, answer ids) with the local model's top-k at each
    answer token: the teacher prompted as for sampling, reading the answer instead of writing one
    (an item's own words, or the student's answer). Local even when the samples come from vLLM: this
    model is loaded to train anyway."""
    for start in range(0, len(pairs), SAMPLE_BATCH):
        chunk = pairs[start:start + SAMPLE_BATCH]
        layers = matched_layers(model.config.num_hidden_layers, states_cfg([q for q, _ in chunk], cfg))
        prompts = [chat_ids(tokenizer, q.messages) for q, _ in chunk]
        seqs = [p + a[:-1] for p, (_, a) in zip(prompts, chunk)]  # the last answer token is only a target
        spans = [(len(p) - 1, len(p) - 1 + len(a)) for p, (_, a) in zip(prompts, chunk)]
        for (q, a), (top_idx, top_logp, hidden) in zip(chunk, topk_at(model, seqs, spans, cfg.topk, layers)):
            yield q, [(a, top_idx, top_logp, hidden)]


@torch.no_grad()
def topk_at(model, seqs: list[list[int]], spans: list[tuple[int, int]], k: int, layers: list[int] = ()) -> list[tuple]:
    """(top_idx, top_logp [end - start, k], hidden [end - start, layers, d] or None) of `model` at
    positions [start, end) of each sequence: its next-token distribution and the outputs of `layers`.
    One right-padded forward pass, the LM head at those positions only."""
    ids, mask = right_padded(seqs, model.device)
    out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers))
    states = torch.stack([out.hidden_states[i] for i in layers], 2) if layers else None  # [B, S, layers, d]
    tops = []
    for b, (start, end) in enumerate(spans):
        top = model.lm_head(out.last_hidden_state[b, start:end]).float().log_softmax(-1).topk(k, dim=-1)
        tops.append((top.indices.cpu(), top.values.cpu(), None if states is None else states[b, start:end].cpu()))
    return tops


def remote_samples(tokenizer, queries: list[Query], cfg: EngineConfig):
    """Yield (query, its samples) from vLLM serving the live model (bench_teacher.py compares the two
    samplers, bench_news_vllm.py whole bakes). One greedy request (greedy_first) and one with n
    samples per query, REMOTE_CONCURRENCY queries in flight. vLLM's top_logprobs hold the sampled
    token and the top others, k in all: a set of tokens with their true log-probs, which is all
    topk_kl needs. The server needs --max-logprobs >= topk (the daemon starts it with 64)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..client import ModelClient

    if not cfg.teacher_url:
        raise ValueError("teacher 'vllm' needs teacher_url (the daemon sets it to its vLLM)")

    def ask(client, q: Query):
        n, max_tokens = _sampling(q, cfg)
        greedy = 1 if cfg.greedy_first and n else 0
        body = {"model": cfg.teacher_model, "max_tokens": max_tokens,
                "messages": q.messages,
                "logprobs": True, "top_logprobs": cfg.topk, "return_tokens_as_token_ids": True}
        choices = []
        for count, temperature in ((greedy, 0.0), (n - greedy, cfg.temperature)):
            if count:
                choices += client.complete({**body, "n": count, "temperature": temperature})["choices"]
        return q, [_remote_sample(c, cfg.topk) for c in choices]

    client = ModelClient(cfg.teacher_url, cfg.teacher_api_key, timeout=600)
    with ThreadPoolExecutor(REMOTE_CONCURRENCY) as pool:
        yield from pool.map(lambda q: ask(client, q), queries)


def _remote_sample(choice: dict, k: int) -> tuple[list[int], torch.Tensor, torch.Tensor, None]:
    """(answer ids, top_idx [T, k], top_logp [T, k], no hidden states: vLLM does not return them)
    of one vLLM choice (tokens as "token_id:N")."""
    steps = choice["logprobs"]["content"]
    answer = [int(step["token"].removeprefix("token_id:")) for step in steps]
    top_idx = torch.zeros(len(steps), k, dtype=torch.long)
    top_logp = torch.full((len(steps), k), -9999.0)  # padding: no mass (vLLM floors -inf at -9999)
    for t, step in enumerate(steps):
        top = step["top_logprobs"][:k] or [{"token": step["token"], "logprob": step["logprob"]}]
        top_idx[t, :len(top)] = torch.tensor([int(x["token"].removeprefix("token_id:")) for x in top])
        top_idx[t, len(top):] = top_idx[t, 0]
        top_logp[t, :len(top)] = torch.tensor([float(x["logprob"]) for x in top])
    return answer, top_idx, top_logp, None


def sample(model, prompts: list[list[int]], n: int, cfg: EngineConfig, eos: int, max_new_tokens: int):
    """n answers per prompt (temperature sampling, left-padded batch, one prefill per prompt).

    Returns (answers: token lists ending at eos when they ended, top_idx [B*n, T, k], top_logp [B*n, T, k],
    hidden [B*n, T, layers, d] at matched_layers() or None).
    """
    on = model.device
    layers = matched_layers(model.config.num_hidden_layers, cfg)
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts], device=on)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=on)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions start at each prompt
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                output_hidden_states=bool(layers))
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)
    mask = mask.repeat_interleave(n, 0)
    gen = torch.Generator(device=on).manual_seed(cfg.seed + len(prompts) * 7919 + width)
    tokens, idx_steps, logp_steps, hidden_steps = [], [], [], []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=on)
    greedy_rows = torch.arange(logits.shape[0], device=on) % n == 0
    for _ in range(max_new_tokens):
        logp = logits.log_softmax(-1)
        top = logp.topk(cfg.topk, dim=-1)
        idx_steps.append(top.indices)
        logp_steps.append(top.values)
        if layers:  # the states that made these logits: the prompt's last position, then each new token's
            hidden_steps.append(torch.stack([out.hidden_states[i][:, -1] for i in layers], 1))
            if len(hidden_steps) == 1:
                hidden_steps[0] = hidden_steps[0].repeat_interleave(n, 0)
        probs = (logits / cfg.temperature).softmax(-1) if cfg.temperature > 0 else None
        token = torch.multinomial(probs, 1, generator=gen)[:, 0] if probs is not None else logits.argmax(-1)
        if cfg.greedy_first:
            token[greedy_rows] = logits[greedy_rows].argmax(-1)
        token = torch.where(done, torch.full_like(token, eos), token)
        tokens.append(token)
        done |= token == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype, device=on)], 1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=cache, use_cache=True, output_hidden_states=bool(layers))
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    seqs = torch.stack(tokens, 1).tolist()
    answers = [s[:s.index(eos) + 1] if eos in s else s for s in seqs]
    hidden = torch.stack(hidden_steps, 1).cpu() if layers else None
    return answers, torch.stack(idx_steps, 1).cpu(), torch.stack(logp_steps, 1).cpu(), hidden


def _sampling(q: Query, cfg: EngineConfig) -> tuple[int, int]:
    """(answers to sample, their max tokens) for one query. Anchors need fewer samples: their
    teacher is the student at step 0."""
    anchor = q.kind == "anchor"
    n = q.samples if q.samples is not None else cfg.anchor_samples if anchor else cfg.samples_per_query
    return n, q.max_new_tokens or (cfg.anchor_max_tokens if anchor else cfg.max_new_tokens)


def _by_samples(chunk: list[Query], cfg: EngineConfig):
    """The chunk's queries grouped by (samples, max tokens): one sampling call per group."""
    groups: dict[tuple[int, int], list[Query]] = {}
    for q in chunk:
        groups.setdefault(_sampling(q, cfg), []).append(q)
    return [(key, group) for key, group in groups.items() if key[0]]
