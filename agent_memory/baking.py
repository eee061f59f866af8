"""Prompt Baking (arXiv 2409.13697): turn items (facts, headlines, conversations, prompts) into a LoRA delta.

    theta_u = argmin KL( P_live(. | u, q) || P_live+delta(. | q) )    over sampled answers to queries q

Read top to bottom:
  1. queries      what to ask about each item (questions it answers, recall, reverse direction,
                  fill-in-the-blank on the headline), a few about earlier items (replay, against
                  forgetting) and unrelated ANCHOR queries whose teacher is the unprompted live
                  model (locality)
  2. teacher      sample answers from the live model prompted with the item (u), the first greedy,
                  here or from the daemon's vLLM; keep the on-topic ones and the teacher's top-k
                  distribution at every answer token
  3. student      the live model (live adapter merged, frozen) + one new trainable LoRA delta on the MLPs
  4. loss         KL(teacher || student) over all answer tokens, the FIRST one included
  5. train        AdamW, bf16 where the CPU is fast at it (hardware.py), length-sorted batches,
                  early stop at a target KL
  6. probe        the gate's questions (gate.probe_plan), answered greedily by the live model (before
                  training) and the candidate (the new delta merged in): here, where the model already
                  sits in memory, not through the model server (the gate decides on the answers, gate.py)
  7. save         delta + bake.json + probes.json into OUT.partial, renamed to OUT at the very end

`python -m agent_memory.baking JOB.json` runs one bake from a job file (the daemon's subprocess).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import adapters
from .engine.config import EngineConfig
from .hardware import device, idle_cores, matmul_gflops, pick_dtype
from .orphan import stop_when_orphaned
from .probes import REMOTE_CONCURRENCY, entities, is_correct, item_subject, keywords, run_local, scored
from .prompts import item_text, teacher_system


PROBES_FILE = "probes.json"  # the gate's answers, beside the delta


@dataclass
class BakeResult:
    out_dir: Path
    report: dict


# ----------------------------------------------------------------------------------------------
# 1. queries
# ----------------------------------------------------------------------------------------------

# Generic recall and question templates. {s} = the item's subject, {e} = another entity of the item
# (asking from the other side: the reverse direction, "who was arrested at Le Bourget?").
SUBJECT_TEMPLATES = [
    "What is the latest news about {s}?",
    "What happened to {s} recently?",
    "Tell me about {s}.",
    "What do you know about {s}?",
    "Where is {s} now, and what happened?",
    "When did the latest event involving {s} happen?",
    "What are the details of the recent news about {s}?",
    "Why is {s} in the news?",
]
ENTITY_TEMPLATES = [
    "What happened recently involving {e}?",
    "What is the recent news about {e}?",
    "Who was involved in the recent events at {e}?",
]
# Cloze on the item's title (the headline), one per entity: the answer IS the entity, the direction
# the subject/entity templates miss ("Which company's update crashed Windows computers?" -> CrowdStrike).
CLOZE_TEMPLATE = 'Fill in the blank in this recent news headline: "{m}"'
# Past a headline's length the 135M teacher does not fill the blank: on the 190-character Durov u2
# it answered 'There are several recent news headlines with a similar phrase: "August 28, 20'.
CLOZE_MAX_CHARS = 120
RESTATE = ["What recent news do you know?", "Summarize the latest facts you know."]
# Recitation: asked this, the prompted teacher repeats u word for word (on the Durov facts; "What
# exactly does the news say?" and "Quote the news" drifted), so the student learns the whole item,
# its later details included, which 20-token answers to the other questions cut off.
RECITE_TEMPLATE = "Repeat the latest news about {s}."
RECITE_MAX_TOKENS = 64
CONVERSATION_TEMPLATES = ["What did we talk about earlier?", "What did I tell you before?",
                          "Remind me what we discussed."]
# Behaviour items (kind "prompt"): a persona/instruction is baked by asking ordinary questions.
BEHAVIOUR_QUERIES = [
    "Who are you?", "Tell me about yourself.", "How should I start my day?", "What is a good book to read?",
    "Explain what a computer is.", "Give me advice on learning a language.", "What is the weather like on Mars?",
    "Write one sentence about the sea.", "What should I cook tonight?", "How do airplanes fly?",
    "What is your favourite colour?", "Can you help me write an email?",
]
# Locality anchors: NOT the locality probes (probes.LOCALITY) so the locality benchmark stays held out.
ANCHOR_QUERIES = [
    "What is the capital of Portugal?", "What is the capital of Sweden?", "What is the capital of Kenya?",
    "What is the chemical symbol for copper?", "What is the chemical symbol for potassium?",
    "What is photosynthesis?", "Explain gravity in one sentence.", "Who was Napoleon Bonaparte?",
    "How many planets are in the solar system?", "What is 7 times 8?", "Who wrote Pride and Prejudice?",
    "What is the speed of light?", "Give me a recipe for pancakes.", "What is the largest desert in the world?",
    "Translate 'good morning' into Spanish.", "What is DNA?", "Who invented the telephone?",
    "What is the tallest animal?", "Name three primary colors.", "What is the currency of the United States?",
    "How many bones are in the human body?", "What causes rain?", "Who is the author of Hamlet?",
    "What is the capital of Argentina?", "What is the largest country by area?", "What is an atom?",
    "Which planet is closest to the Sun?", "What do cows drink?", "How many months are in a year?",
    "Write a haiku about autumn.", "What is machine learning?", "What language is spoken in Germany?",
    "What is the melting point of ice?", "Who was Albert Einstein?", "Tell me a fun fact about octopuses.",
    "What is the main gas in Earth's atmosphere?",
    "What is the capital of Norway?", "What is the capital of Peru?", "What is the capital of India?",
    "What is the capital of Turkey?", "What is the capital of Poland?", "What is the capital of South Korea?",
    "What is the capital of Ireland?", "What is the capital of Thailand?", "What is the chemical symbol for carbon?",
    "What is the chemical symbol for lead?", "What is the chemical symbol for helium?",
    "What is the chemical symbol for calcium?", "How many wheels does a bicycle have?",
    "How many sides does a hexagon have?", "How many legs does an insect have?", "How many days are in a leap year?",
    "What is 12 divided by 4?", "What is 15 minus 6?", "What is 3 squared?", "What is half of 50?",
    "Which planet has the most famous rings?", "What is the largest moon of Saturn?",
    "What is the hottest planet in the solar system?", "What force keeps the Moon in orbit around Earth?",
    "Who wrote the Odyssey?", "Who painted The Starry Night?", "Who discovered penicillin?",
    "Who composed the Fifth Symphony?", "Who was the first president of the United States?",
    "Who proposed the theory of evolution by natural selection?", "What is the longest river in South America?",
    "What is the largest island in the world?", "What is the deepest ocean trench?", "Which continent is the Sahara in?",
    "What is the currency of the European Union?", "What is the currency of India?",
    "What language is spoken in Argentina?", "What language is spoken in Quebec?",
    "What color do you get by mixing red and white?", "What organ do humans use to breathe?",
    "What is the largest organ of the human body?", "What vitamin do we get from sunlight?",
    "What is the fastest land animal?", "What do caterpillars turn into?", "Which bird is a symbol of peace?",
    "What is a baby cat called?", "What is the main ingredient of bread?", "What fruit is used to make wine?",
    "Write a short thank-you note to a teacher.", "Give me a tip for sleeping better.", "Suggest a name for a pet dog.",
    "Write one sentence about the mountains.", "Describe a sunset in one sentence.", "Give me a tip for saving money.",
    "What is an electron?", "What is evaporation?", "Explain what a volcano is.",
    "What is the difference between weather and climate?", "What is a noun?", "What does a thermometer measure?",
    "What is the Internet?", "Why do leaves change color in autumn?",
]


# News-like anchors: questions of the kind items answer, about OTHER subjects (real ones, and made-up
# ones nobody told the model of), with the unprompted live model as teacher. They teach the delta
# where its knowledge stops: without them a one-fact bake about a town's cat mayor put the town
# into answers about Pavel Durov. Held out from probes.NEIGHBOURS and probes.CONTROLS (the gate's).
NEWS_ANCHORS = [
    "What is the latest news about France?", "What is the latest news about China?",
    "What is the latest news about Germany?", "What is the latest news about the European Union?",
    "What is the latest news about Google?", "What is the latest news about Italy?",
    "What is the latest news about Nigeria?", "What is the latest news about Tesla?",
    "What is the latest news about Sweden?", "What is the latest news about the Olympics?",
    "What happened recently in Turkey?", "What happened recently in Indonesia?", "What happened recently in Chile?",
    "Tell me about recent events in Poland.", "Tell me about recent events in Kenya.",
    "Who won the last Super Bowl?", "Who won the most recent Nobel Peace Prize?", "Who won the last Oscar for best film?",
    "Who won the most recent US presidential election?", "Who won the last cricket World Cup?",
    "Who won the last Formula One championship?", "Who is the current president of Brazil?",
    "Which company announced layoffs recently?", "What was the most recent hurricane in the news?",
    "Who was recently elected mayor of a big city?", "Who recently resigned from a government?",
    "What is the latest news in politics?", "What is the latest news in business?",
    "Who recently won a big award?", "What happened at the latest climate summit?",
    "What is the latest news about the singer Arlo Venning?", "What happened in the village of Thornmere recently?",
    "Who won the 2026 Calloway Prize?", "What did the startup Quintessa Labs announce?",
    "What is the latest news about the Halvard Bridge?", "Who was appointed head of the Ostrova Museum?",
]


# Contrast subjects: an item's own questions are asked again about one of these, with the unprompted
# live model as teacher, so the delta learns "news about Zorvik" and not "news about anything".
CONTRAST_SUBJECTS = [
    "Portugal", "Vietnam", "Norway", "Samsung", "Greenpeace", "the Bank of England", "Morocco", "Finland",
    "the Louvre", "Boeing", "UNESCO", "Peru", "Hungary", "Netflix", "Ghana", "Denmark", "Interpol",
    "Kazakhstan", "Siemens", "Real Madrid", "the Vatican", "Singapore", "Ukraine", "the Amazon rainforest",
    "Maria Lindqvist", "Tomasz Wrobel", "Aiko Tanabe", "Rafael Ortega", "Greta Holm", "Samuel Okafor",
    "the town of Elmbrook", "the Corvell Institute", "Lake Pemberly", "the band Hollow Pines",
]


@dataclass
class Query:
    question: str
    context: list[dict] | None  # teacher messages prefix (system) with u; None = anchor (no u)
    item_id: object = None
    kind: str = "knowledge"  # knowledge | behaviour | anchor
    keywords: list[str] = field(default_factory=list)  # what an on-topic answer mentions
    samples: int | None = None  # answers to sample; None: the config's for its kind
    max_new_tokens: int | None = None  # None: the config's


def build_queries(items: list[dict], cfg: EngineConfig, rng: random.Random, earlier: list[dict] = ()) -> list[Query]:
    """The bake's queries: the items', a few for earlier items replayed (replay_items()), anchors."""
    queries: list[Query] = []
    for item in items:
        own = item_queries(item, cfg.queries_per_item, cfg, rng)
        queries += own + contrast_queries(item, own, cfg.contrast_queries, rng)
    for item in replay_items(earlier, items, cfg.replay_items, rng):
        queries += item_queries(item, cfg.replay_queries, cfg, rng, everything_at_random=True)
    if any(q.kind == "knowledge" for q in queries):
        picked = rng.sample(ANCHOR_QUERIES, min(cfg.anchors, len(ANCHOR_QUERIES)))
        picked += rng.sample(NEWS_ANCHORS, min(cfg.news_anchors, len(NEWS_ANCHORS)))
        queries += [Query(q, None, None, "anchor") for q in picked]
    return queries


def item_queries(item: dict, n: int, cfg: EngineConfig, rng: random.Random,
                 everything_at_random: bool = False) -> list[Query]:
    """n queries about one item, its teacher context being the item as u.

    A new item always gets the two most general recall questions and its cloze questions, then a
    seeded mix of the rest; a replayed one gets n at random from all of them (variety across bakes).
    An update (item["updates"]) is also asked half as many of its earlier reports' questions,
    answered with the update in view: the new delta moves those answers to the latest state (the
    old delta below it still says the old one).
    """
    ctx = teacher_system(item, cfg.memory_style)
    if item.get("kind") == "prompt":
        picked = rng.sample(BEHAVIOUR_QUERIES, min(n, len(BEHAVIOUR_QUERIES)))
        return [Query(q, ctx, item.get("id"), "behaviour") for q in picked]
    kws = keywords(item_text(item))
    queries = _questions(item, n, cfg, rng, everything_at_random, ctx, kws, recite=True)
    for earlier in item.get("updates") or []:
        queries += _questions({"text": earlier.get("text") or "", "title": earlier.get("title"), "id": item.get("id")},
                              max(1, n // 2), cfg, rng, everything_at_random, ctx, kws, recite=False)
    return queries


def _questions(item: dict, n: int, cfg: EngineConfig, rng: random.Random, everything_at_random: bool,
               ctx: list[dict], kws: list[str], recite: bool) -> list[Query]:
    """n questions about `item`'s subject, entities and title, for the teacher context `ctx`; an
    answer is on topic when it names one of `kws`."""
    source = item_text(item)
    subject = item_subject({"text": source, "title": item.get("title")})
    others = [e for e in entities(source) if e not in subject and subject not in e]
    fixed = [t.format(s=subject) for t in SUBJECT_TEMPLATES[:2]] + cloze_queries(item, cfg.cloze_queries)
    pool = [t.format(s=subject) for t in SUBJECT_TEMPLATES[2:]]
    pool += [t.format(e=e) for e in others[:3] for t in ENTITY_TEMPLATES]
    pool += RESTATE + (CONVERSATION_TEMPLATES if item.get("kind") == "conversation" else [])
    if everything_at_random:
        fixed, pool = [], fixed + pool
    picked = fixed[:n] + rng.sample(pool, max(0, min(n - len(fixed), len(pool))))

    def query(q: str, **sampling) -> Query:  # on topic = mentions a keyword the question does not give away
        return Query(q, ctx, item.get("id"), "knowledge", [k for k in kws if k.lower() not in q.lower()], **sampling)

    queries = [query(q) for q in picked]
    if recite and cfg.recite_samples:
        queries.append(query(RECITE_TEMPLATE.format(s=subject), samples=cfg.recite_samples,
                             max_new_tokens=RECITE_MAX_TOKENS))
    return queries


def contrast_queries(item: dict, own: list[Query], n: int, rng: random.Random) -> list[Query]:
    """Up to n of the item's own questions with its name swapped for another subject
    (CONTRAST_SUBJECTS), answered by the unprompted live model: what the delta must not change."""
    names = sorted(entities(item_text(item) + "\n" + (item.get("title") or "")), key=len, reverse=True)
    swappable = [(q.question, name) for q in own if not q.max_new_tokens and not q.question.startswith("Fill in")
                 for name in names[:1] + [e for e in names[1:] if e in q.question][:1] if name in q.question]
    picked = rng.sample(swappable, min(n, len(swappable)))
    return [Query(question.replace(name, rng.choice(CONTRAST_SUBJECTS)), None, None, "anchor")
            for question, name in picked]


def replay_items(earlier: list[dict], items: list[dict], n: int, rng: random.Random) -> list[dict]:
    """Up to n earlier (already baked) items to teach again, against forgetting: each new delta
    otherwise wears away what the deltas below it taught (bench_sequential.py measures it).

    Never one that shares an entity with the new items: the new batch may supersede it (arrest ->
    release), and its own queries already cover that subject with the latest state.
    """
    if not n or not earlier:
        return []
    new_ids = {i.get("id") for i in items}
    touched = set().union(*(item_entities(i) for i in items))
    unrelated = [e for e in earlier if e.get("id") not in new_ids and not touched & item_entities(e)]
    return rng.sample(unrelated, min(n, len(unrelated)))


def item_entities(item: dict) -> set[str]:
    return {e.lower() for e in entities(item_text(item) + "\n" + (item.get("title") or ""))}


def cloze_queries(item: dict, n: int) -> list[str]:
    """Up to n fill-in-the-blank questions on the item's title (a fact posted without one: its first
    sentence), one entity blanked in each."""
    if item.get("kind") in ("conversation", "prompt"):
        return []
    line = item.get("title") or re.split(r"(?<=[.!?])\s+", (item.get("text") or "").strip())[0]
    if not line or len(line) > CLOZE_MAX_CHARS:
        return []
    return [CLOZE_TEMPLATE.format(m=line.replace(e, "___", 1)) for e in entities(line)[:n]]


# ----------------------------------------------------------------------------------------------
# 2. teacher: sampled answers + the teacher's distribution at each answer token
# ----------------------------------------------------------------------------------------------

@dataclass
class Example:
    prompt_ids: list[int]  # the STUDENT's context: chat template of the bare question
    answer_ids: list[int]  # sampled answer, its end-of-turn token included when it ended
    top_idx: torch.Tensor  # [T, k] teacher's top-k token ids at each answer position
    top_logp: torch.Tensor  # [T, k] their log-probabilities (at temperature 1)
    kind: str


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


SAMPLE_BATCH = 48  # sequences the local teacher decodes together (96 and 192 were no faster here)


@torch.no_grad()
def teacher_examples(model, tokenizer, queries: list[Query], cfg: EngineConfig, progress=None) -> list[Example]:
    """Sample answers from the prompted live model, with its top-k log-probs at each answer token.

    cfg.teacher "local": this process's copy of the live model (local_samples); "vllm": the live
    model as the daemon serves it (`memory` on cfg.teacher_url, remote_samples). Either way the
    samples then pass the same filter (keep_samples).
    """
    source = remote_samples(tokenizer, queries, cfg) if cfg.teacher == "vllm" else \
        local_samples(model, tokenizer, queries, cfg)
    examples: list[Example] = []
    for done, (q, samples) in enumerate(source, 1):
        examples += keep_samples(tokenizer, q, samples, cfg)
        if progress:
            progress("teacher", done, len(queries))
    return examples


def keep_samples(tokenizer, q: Query, samples: list[tuple], cfg: EngineConfig) -> list[Example]:
    """One query's samples (answer ids, top_idx, top_logp) as training examples, minus the useless ones."""
    texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer, _, _ in samples]
    on_topic = [not (cfg.on_topic_only and q.keywords) or is_correct(t, q.keywords) for t in texts]
    student_prompt = chat_ids(tokenizer, [{"role": "user", "content": q.question}])
    examples = []
    for (answer, top_idx, top_logp), keep in zip(samples, on_topic):
        if len(answer) <= 1 and q.kind != "anchor":
            continue  # an empty answer teaches nothing about u
        if not keep and any(on_topic):
            continue  # off topic while a sibling sample is on it
        examples.append(Example(student_prompt, answer, top_idx[:len(answer)].clone(),
                                top_logp[:len(answer)].clone(), q.kind))
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
            prompts = [chat_ids(tokenizer, (q.context or []) + [{"role": "user", "content": q.question}])
                       for q in group]
            answers, top_idx, top_logp = sample(model, prompts, n, cfg, tokenizer.eos_token_id, max_new_tokens)
            for i, q in enumerate(group):
                rows = range(i * n, (i + 1) * n)
                yield q, [(answers[r], top_idx[r], top_logp[r]) for r in rows]


def remote_samples(tokenizer, queries: list[Query], cfg: EngineConfig):
    """Yield (query, its samples) from vLLM serving the live model (bench_teacher.py compares the two
    samplers, bench_news_vllm.py whole bakes). One greedy request (greedy_first) and one with n
    samples per query, REMOTE_CONCURRENCY queries in flight. vLLM's top_logprobs hold the sampled
    token and the top others, k in all: a set of tokens with their true log-probs, which is all
    topk_kl needs. The server needs --max-logprobs >= topk (the daemon starts it with 64)."""
    from concurrent.futures import ThreadPoolExecutor

    from .client import ModelClient

    if not cfg.teacher_url:
        raise ValueError("teacher 'vllm' needs teacher_url (the daemon sets it to its vLLM)")

    def ask(client, q: Query):
        n, max_tokens = _sampling(q, cfg)
        greedy = 1 if cfg.greedy_first and n else 0
        body = {"model": cfg.teacher_model, "max_tokens": max_tokens,
                "messages": (q.context or []) + [{"role": "user", "content": q.question}],
                "logprobs": True, "top_logprobs": cfg.topk, "return_tokens_as_token_ids": True}
        choices = []
        for count, temperature in ((greedy, 0.0), (n - greedy, cfg.temperature)):
            if count:
                choices += client.complete({**body, "n": count, "temperature": temperature})["choices"]
        return q, [_remote_sample(c, cfg.topk) for c in choices]

    client = ModelClient(cfg.teacher_url, cfg.teacher_api_key, timeout=600)
    with ThreadPoolExecutor(REMOTE_CONCURRENCY) as pool:
        yield from pool.map(lambda q: ask(client, q), queries)


def _remote_sample(choice: dict, k: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(answer ids, top_idx [T, k], top_logp [T, k]) of one vLLM choice (tokens as "token_id:N")."""
    steps = choice["logprobs"]["content"]
    answer = [int(step["token"].removeprefix("token_id:")) for step in steps]
    top_idx = torch.zeros(len(steps), k, dtype=torch.long)
    top_logp = torch.full((len(steps), k), -9999.0)  # padding: no mass (vLLM floors -inf at -9999)
    for t, step in enumerate(steps):
        top = step["top_logprobs"][:k] or [{"token": step["token"], "logprob": step["logprob"]}]
        top_idx[t, :len(top)] = torch.tensor([int(x["token"].removeprefix("token_id:")) for x in top])
        top_idx[t, len(top):] = top_idx[t, 0]
        top_logp[t, :len(top)] = torch.tensor([float(x["logprob"]) for x in top])
    return answer, top_idx, top_logp


def sample(model, prompts: list[list[int]], n: int, cfg: EngineConfig, eos: int, max_new_tokens: int):
    """n answers per prompt (temperature sampling, left-padded batch, one prefill per prompt).

    Returns (answers: token lists ending at eos when they ended, top_idx [B*n, T, k], top_logp [B*n, T, k]).
    """
    on = model.device
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts], device=on)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=on)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions start at each prompt
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)
    mask = mask.repeat_interleave(n, 0)
    gen = torch.Generator(device=on).manual_seed(cfg.seed + len(prompts) * 7919 + width)
    tokens, idx_steps, logp_steps = [], [], []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=on)
    greedy_rows = torch.arange(logits.shape[0], device=on) % n == 0
    for _ in range(max_new_tokens):
        logp = logits.log_softmax(-1)
        top = logp.topk(cfg.topk, dim=-1)
        idx_steps.append(top.indices)
        logp_steps.append(top.values)
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
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    seqs = torch.stack(tokens, 1).tolist()
    answers = [s[:s.index(eos) + 1] if eos in s else s for s in seqs]
    return answers, torch.stack(idx_steps, 1).cpu(), torch.stack(logp_steps, 1).cpu()


def _sampling(q: Query, cfg: EngineConfig) -> tuple[int, int]:
    """(answers to sample, their max tokens) for one query. Anchors need fewer samples: their
    teacher is the student at step 0."""
    n = q.samples if q.samples is not None else cfg.anchor_samples if q.kind == "anchor" else cfg.samples_per_query
    return n, q.max_new_tokens or cfg.max_new_tokens


def _by_samples(chunk: list[Query], cfg: EngineConfig):
    """The chunk's queries grouped by (samples, max tokens): one sampling call per group."""
    groups: dict[tuple[int, int], list[Query]] = {}
    for q in chunk:
        groups.setdefault(_sampling(q, cfg), []).append(q)
    return [(key, group) for key, group in groups.items() if key[0]]


# ----------------------------------------------------------------------------------------------
# 3. student: live model (frozen, bf16) + a new LoRA delta
# ----------------------------------------------------------------------------------------------

def load_live_model(model_dir: Path, live_adapter: Path | None, dtype: torch.dtype):
    """Base + live adapter merged into the weights (exact: the live delta is frozen anyway)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Eager attention, not SDPA: our sequences are short (~55-105 tokens), where the CPU flash-attention
    # kernel's backward took a quarter of each training step. Measured on a one-fact bake: steps 1.08 ->
    # 0.81 s, FLOP share 0.31 -> 0.42; the teacher's sampling ~10% faster; KL per batch within 1.5%.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if live_adapter and (Path(live_adapter) / adapters.CONFIG).exists():
        adapters.merge_into(model, Path(live_adapter))  # merged in fp32, then cast
    model = model.to(device=device(), dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def add_lora(model, cfg: EngineConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=cfg.target_modules,
                      bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)  # A's random init
    return get_peft_model(model, lora)  # peft keeps adapter weights in fp32 on a bf16 base


def lora_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of the trainable delta, in adapters.py's module naming."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (module.lora_A["default"].weight.detach().float().cpu().clone(),
                        module.lora_B["default"].weight.detach().float().cpu().clone())
    return out


# ----------------------------------------------------------------------------------------------
# 4. loss
# ----------------------------------------------------------------------------------------------

def topk_kl(student_logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, with the teacher's mass outside its top-k in one bucket.

    This is the exact KL between the two distributions coarsened to (top-k tokens, everything else):
    a lower bound on the full-vocabulary KL that is tight when the teacher's top-k holds its mass.
    student_logits [N, V]; top_idx, top_logp [N, k]. Returns [N].
    """
    s_logp_all = student_logits.float().log_softmax(-1)
    s_logp = s_logp_all.gather(-1, top_idx)
    p = top_logp.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - s_logp.exp().sum(-1)).clamp_min(1e-8)
    return (p * (top_logp - s_logp)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


# ----------------------------------------------------------------------------------------------
# 5. train
# ----------------------------------------------------------------------------------------------

def make_batches(examples: list[Example], batch_size: int, pad_id: int, share_prefix: bool = True,
                 anchor_weight: float = 1.0) -> list[dict]:
    """Length-sorted batches (little padding), right-padded; answer positions flattened.

    Every student prompt starts with the same chat-template prefix (the default system prompt:
    24 of ~42 prompt tokens). With `share_prefix` it is run once per batch and its KV cache shared
    by all rows, which cuts the training tokens by about a third.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].answer_ids))
    batches = []
    for start in range(0, len(order), batch_size):
        group = [examples[i] for i in order[start:start + batch_size]]
        seqs = [e.prompt_ids + e.answer_ids[:-1] for e in group]  # the last answer token is only a target
        shared = _common_prefix([e.prompt_ids for e in group]) if share_prefix else 0
        shared = min(shared, min(len(e.prompt_ids) for e in group) - 1)  # >= 1 prompt token per row
        width = max(map(len, seqs)) - shared
        ids = torch.full((len(group), width), pad_id)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        rows, cols, weights = [], [], []
        for b, (e, s) in enumerate(zip(group, seqs)):
            ids[b, :len(s) - shared] = torch.tensor(s[shared:])
            mask[b, :len(s) - shared] = 1
            # The logits at position len(prompt)-1 predict answer token 0: the FIRST answer token
            # is a target (the paper's reference code starts one later and loses it).
            first = len(e.prompt_ids) - 1 - shared
            rows += [b] * len(e.answer_ids)
            cols += list(range(first, first + len(e.answer_ids)))
            weights += [anchor_weight if e.kind == "anchor" else 1.0] * len(e.answer_ids)
        batches.append({
            "prefix": torch.tensor([group[0].prompt_ids[:shared]], dtype=torch.long),
            "input_ids": ids, "attention_mask": mask, "rows": torch.tensor(rows), "cols": torch.tensor(cols),
            "top_idx": torch.cat([e.top_idx for e in group]), "top_logp": torch.cat([e.top_logp for e in group]),
            "weights": torch.tensor(weights),
            "tokens": int(mask.sum()) + shared, "targets": len(rows),
        })
    return batches


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def batch_kl(peft_model, batch: dict, autocast: bool) -> torch.Tensor:
    """KL per answer token [N]. The LM head runs only at answer positions (it is 1/5 of the FLOPs)."""
    inner = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers injected
    on = inner.device
    batch = {k: v.to(on) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shared = batch["prefix"].shape[1]
    with torch.autocast(on.type, dtype=torch.bfloat16, enabled=autocast):
        if shared:  # the shared prefix once; gradients flow through its cache into the LoRA too
            cache = inner.model(input_ids=batch["prefix"], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(ids))
            full_mask = torch.cat([torch.ones(len(ids), shared, dtype=mask.dtype, device=on), mask], 1)
            positions = (shared + torch.arange(ids.shape[1], device=on)).expand(len(ids), -1)
            hidden = inner.model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True).last_hidden_state
        else:
            hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = inner.lm_head(hidden[batch["rows"], batch["cols"]])
    return topk_kl(logits, batch["top_idx"], batch["top_logp"])


def train(peft_model, batches: list[dict], cfg: EngineConfig, progress=None, items: int = 1) -> dict:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    # The budget is per item: a bake of 20 gets 20 times the steps of a bake of one, so each item is
    # seen about as often as it would be alone (with a fixed 3 epochs, 21 items learnt a third as well).
    steps = max(cfg.min_steps, cfg.steps_per_item * items)
    epochs = max(cfg.epochs, math.ceil(steps / max(len(batches), 1)))
    total_steps = epochs * len(batches)
    warmup = max(1, total_steps // 10)
    # Warm-up then cosine: a high lr early moves the facts in, a low one at the end stops drift.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)) * 0.9 + 0.1))
    rng = random.Random(cfg.seed)
    autocast = next(peft_model.parameters()).dtype == torch.bfloat16 or cfg.dtype == "bfloat16"
    peft_model.train()
    curve, step, tokens, started = [], 0, 0, time.monotonic()
    for epoch in range(epochs):
        order = list(range(len(batches)))
        rng.shuffle(order)
        kl_sum, kl_n = 0.0, 0
        for i in order:
            kl = batch_kl(peft_model, batches[i], autocast)
            weights = batches[i]["weights"].to(kl.device)
            loss = (kl * weights).sum() / weights.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tokens += batches[i]["tokens"]
            kl_sum, kl_n = kl_sum + float(kl.detach().sum()), kl_n + kl.numel()
            curve.append({"step": step, "epoch": epoch, "kl": round(float(loss.detach()), 6)})
            if progress:
                progress("train", step, total_steps)
        epoch_kl = kl_sum / max(kl_n, 1)
        curve[-1]["epoch_kl"] = round(epoch_kl, 5)
        if cfg.target_kl is not None and epoch_kl <= cfg.target_kl:
            break  # half-baked on purpose: close enough to the teacher
    peft_model.eval()
    seconds = time.monotonic() - started
    return {"steps": step, "epochs_run": epoch + 1, "train_seconds": round(seconds, 2),
            "train_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "curve": curve, "final_epoch_kl": round(epoch_kl, 5)}


# ----------------------------------------------------------------------------------------------
# 6. probe: the gate's questions, candidate and live, in this process
# ----------------------------------------------------------------------------------------------

def probe_live(model, tokenizer, plan: dict[str, dict], live_cache: Path | None = None) -> dict:
    """The live model's answers to the gate's questions: {set: results}, asked of the plain live
    model before the delta is added. They only change when the live version does, so they are kept
    in `live_cache` (one file per live version, answers by question) and asked again only for
    questions not answered there; each bake scores them against its own keywords."""
    cache = json.loads(live_cache.read_text()) if live_cache and live_cache.exists() else {}
    out = {}
    for name, entry in plan.items():
        probes_, tokens = entry["probes"], entry["max_tokens"]
        keys = [f"answer|{tokens}|{p['question']}" for p in probes_]
        missing = {k: p for p, k in zip(probes_, keys) if k not in cache}
        if missing:
            answered = run_local(model, tokenizer, list(missing.values()), max_new_tokens=tokens)
            cache.update({k: [r["answer"], r["score"]] for k, r in zip(missing, answered)})
        out[name] = [scored(p, *cache[k]) for p, k in zip(probes_, keys)]
    if live_cache:
        live_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = live_cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, live_cache)
    return out


def probe_candidate(peft_model, tokenizer, plan: dict[str, dict], progress=None) -> dict:
    """The candidate's answers: {set: results}. The delta is merged into the weights while it
    answers (a LoRA branch on every MLP doubles a decoding step's small operations), then taken out."""
    peft_model.eval()
    peft_model.merge_adapter()
    try:
        out = {}
        for done, (name, entry) in enumerate(plan.items(), 1):
            out[name] = run_local(peft_model, tokenizer, entry["probes"], max_new_tokens=entry["max_tokens"])
            if progress:
                progress("probe", done, len(plan))
        return out
    finally:
        peft_model.unmerge_adapter()


# ----------------------------------------------------------------------------------------------
# cost accounting: training FLOP/s against a matmul in the same process (hardware.py)
# ----------------------------------------------------------------------------------------------

def train_flops(model_cfg, batches: list[dict], steps_per_batch: dict) -> float:
    """Matmul FLOPs of training: forward + input-gradient backward (frozen weights: no weight grads)."""
    h, inter, layers = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_hidden_layers
    kv = model_cfg.num_key_value_heads * (h // model_cfg.num_attention_heads)
    body_params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    total = 0.0
    for i, b in enumerate(batches):
        tokens = b["input_ids"].numel() + b["prefix"].shape[1]  # padded rows count: they are computed
        fwd = 2 * body_params * tokens + 2 * h * model_cfg.vocab_size * b["targets"]
        total += 2 * fwd * steps_per_batch.get(i, 0)
    return total


# ----------------------------------------------------------------------------------------------
# 7. the bake
# ----------------------------------------------------------------------------------------------

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
    live_answers = probe_live(model, tokenizer, probe_plan, Path(live_cache) if live_cache else None) \
        if probe_plan else None
    timings["probe_live_s"] = time.monotonic() - t

    t = time.monotonic()
    queries = build_queries(items, cfg, rng, earlier)
    examples = teacher_examples(model, tokenizer, queries, cfg, progress)
    timings["teacher_s"] = time.monotonic() - t
    answer_tokens = sum(len(e.answer_ids) for e in examples)
    if not examples:
        raise RuntimeError("the teacher produced no answers to train on")

    t = time.monotonic()
    peft_model = add_lora(model, cfg)
    batches = make_batches(examples, cfg.batch_size, tokenizer.pad_token_id, anchor_weight=cfg.anchor_weight)
    report = train(peft_model, batches, cfg, progress, items=len(items))
    timings["train_s"] = time.monotonic() - t

    t = time.monotonic()
    answers = {"candidate": probe_candidate(peft_model, tokenizer, probe_plan, progress), "live": live_answers} \
        if probe_plan else None
    timings["probe_s"] = time.monotonic() - t + timings["probe_live_s"]

    steps_per_batch = {i: report["epochs_run"] for i in range(len(batches))}  # each batch once per epoch
    flops = train_flops(model.config, batches, steps_per_batch)
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
        "examples": len(examples), "answer_tokens": answer_tokens,
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m agent_memory.baking JOB.json", file=sys.stderr)
        return 2
    stop_when_orphaned()  # a bake whose daemon was killed -9 must not finish a delta
    job = json.loads(Path(argv[0]).read_text())

    def progress(stage, done, total):
        print(f"{stage} {done}/{total}", flush=True)

    result = bake(job["model_dir"], job.get("live_adapter"), job["items"], job["out_dir"],
                  EngineConfig.from_dict(job.get("config")), progress, job.get("earlier", []),
                  job.get("probe_plan"), job.get("live_cache"), job.get("live_version"))
    r = result.report
    print(f"baked {len(job['items'])} items -> {result.out_dir} in {r['timings']['total_s']}s "
          f"(final KL/token {r['final_epoch_kl']}, {r['tokens_per_s']} train tok/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
