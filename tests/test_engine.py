"""The baking engine (agent_memory/engine/): loss, batching, queries, end-to-end bakes (tiny model), kill -9, and one real bake."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agent_memory import adapters, probes, prompts
from agent_memory.engine import PROBES_FILE, queries, teacher, train
from agent_memory.engine.bake import bake
from agent_memory.engine.config import MLP_MODULES, EngineConfig

REPO = Path(__file__).resolve().parent.parent
REAL_MODEL = REPO / "state" / "models" / "smollm2-135m-instruct"
DUROV = probes.set_facts("durov")
U1 = {"id": 1, "kind": "headline", "text": DUROV["u1"]["text"], "source": "test", "valid_at": "2024-08-24"}


# -- the package -------------------------------------------------------------------------------

def test_the_engine_package_its_config_and_its_queries_import_without_torch():
    """The daemon reads the engine's settings and output names, and the queries are plain text:
    none of that may pull in torch (only the trainer subprocess does)."""
    code = ("import sys, agent_memory.engine, agent_memory.engine.config, agent_memory.engine.queries\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_job_entry_point_without_a_job_file_prints_its_usage():
    done = subprocess.run([sys.executable, "-m", "agent_memory.engine"], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "usage: python -m agent_memory.engine JOB.json" in done.stderr


# -- the loss ----------------------------------------------------------------------------------

def test_topk_kl_with_the_whole_vocab_is_the_exact_kl():
    torch.manual_seed(0)
    t, s = torch.randn(5, 11), torch.randn(5, 11)
    top_logp, top_idx = t.log_softmax(-1).topk(11)
    exact = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(train.topk_kl(s, top_idx, top_logp), exact, rtol=1e-4, atol=1e-5)


def test_topk_kl_is_zero_at_the_teacher_and_a_lower_bound_elsewhere():
    torch.manual_seed(1)
    t, s = torch.randn(7, 50) * 3, torch.randn(7, 50)
    top_logp, top_idx = t.log_softmax(-1).topk(8)
    assert float(train.topk_kl(t, top_idx, top_logp).abs().max()) < 1e-5
    exact = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    approx = train.topk_kl(s, top_idx, top_logp)
    assert bool((approx > 0).all()) and bool((approx <= exact + 1e-5).all())


def test_topk_kl_gradient_is_autograds_through_log_softmax():
    """topk_kl writes its gradient out (no [N, V] float tensor kept): it must be autograd's gradient
    of the same formula through log_softmax, for bfloat16, float32 and float64 logits, with vLLM's
    padding (repeated tokens with no mass) and, in float64, a row whose top-k holds all the
    student's mass (q_rest clamped: in float32 that row is rounding noise either way)."""
    def through_log_softmax(logits, top_idx, top_logp):
        s = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).gather(-1, top_idx)
        p = top_logp.exp()
        p_rest, q_rest = (1 - p.sum(-1)).clamp_min(1e-8), (1 - s.exp().sum(-1)).clamp_min(1e-8)
        return (p * (top_logp - s)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())

    torch.manual_seed(2)
    t = torch.randn(300, 700, dtype=torch.float64) * 3  # more rows than one block of _TopkKL
    top_logp, top_idx = t.log_softmax(-1).topk(16)
    top_idx[0, 3:], top_logp[0, 3:] = top_idx[0, 2], -9999.0
    weights = torch.rand(300, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        logits = torch.randn(300, 700, dtype=torch.float64) * 3
        if dtype == torch.float64:
            logits[1].scatter_(-1, top_idx[1], 60.0)
        results = []
        for kl in (through_log_softmax, train.topk_kl):
            x = logits.to(dtype).requires_grad_()
            target = top_logp.to(torch.promote_types(dtype, torch.float32))
            value = kl(x, top_idx, target)
            (value * weights.to(value.dtype)).sum().backward()
            results.append((value.detach().double(), x.grad.double()))
        (value, grad), (expected, expected_grad) = results[1], results[0]
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)
        # A bfloat16 gradient is rounded to 8 bits: the two may differ by its last bit (2**-8).
        rtol = 2**-7 if dtype == torch.bfloat16 else 1e-3
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=1e-6, msg=lambda m: f"{dtype}: {m}")
    x = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: train.topk_kl(x, top_idx[:5, :4] % 30, top_logp[:5, :4]), (x,))


def test_batches_target_the_first_answer_token():
    k = 4
    ex = [teacher.Example([10, 11, 12], [20, 21, 2], torch.zeros(3, k, dtype=torch.long), torch.zeros(3, k), "knowledge"),
          teacher.Example([10, 11, 12, 13, 14], [30, 2], torch.ones(2, k, dtype=torch.long), torch.zeros(2, k), "anchor")]
    (batch,) = train.make_batches(ex, batch_size=8, pad_id=0, share_prefix=False)
    rows, cols = batch["rows"].tolist(), batch["cols"].tolist()
    # sorted by length: the 6-token example first. Its logits at position 2 (last prompt token)
    # predict the first answer token 20.
    assert list(zip(rows, cols)) == [(0, 2), (0, 3), (0, 4), (1, 4), (1, 5)]
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 20, 21, 0]  # last answer token: target only
    assert batch["input_ids"][1].tolist() == [10, 11, 12, 13, 14, 30]
    # with the shared prefix [10, 11] (at least one prompt token stays per row) positions shift by 2
    (shared,) = train.make_batches(ex, batch_size=8, pad_id=0, share_prefix=True)
    assert shared["prefix"].tolist() == [[10, 11]]
    assert list(zip(shared["rows"].tolist(), shared["cols"].tolist())) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3)]
    assert shared["input_ids"][0].tolist() == [12, 20, 21, 0]
    assert batch["targets"] == 5 and batch["top_idx"].shape == (5, k)


# -- queries -----------------------------------------------------------------------------------

def test_queries_cover_the_item_and_anchors_stay_unprompted():
    import random

    cfg = EngineConfig(queries_per_item=8, anchors=5, news_anchors=3, contrast_queries=4)
    qs = queries.build_queries([U1], cfg, random.Random(0))
    knowledge = [q for q in qs if q.kind == "knowledge"]
    anchors = [q for q in qs if q.kind == "anchor"]
    assert len(knowledge) == 8 + 1 + 3 and len(anchors) == 5 + 3 + 4  # + the recitation, + 3 given answers
    given = [q for q in knowledge if q.answer is not None]
    assert [q.question for q in given] == ["What is the latest news about Pavel Durov?",
                                           "What happened to Pavel Durov recently?",
                                           "What is the recent news about Telegram?"]
    assert all(q.answer == U1["text"] for q in given)
    more = [q.question for q in queries.build_queries([U1], replace(cfg, item_answers=8), random.Random(0)) if q.answer]
    assert len(more) == 8 and more[:3] == [q.question for q in given]
    assert [q for q in more if "Durov" not in q] == ["What is the recent news about Telegram?",  # its other names in turn
                                                     "What happened recently involving Le Bourget?",
                                                     "Who was involved in the recent events at Paris?"]
    assert len([q for q in anchors if q.question in queries.NEWS_ANCHORS]) == 3
    # Contrast: the item's own questions about other subjects, the unprompted model as teacher.
    contrast = [q for q in anchors if q.question not in queries.ANCHOR_QUERIES + queries.NEWS_ANCHORS + queries.RELATION_ANCHORS]
    assert len(contrast) == 4 and not any("Durov" in q.question or "Bourget" in q.question for q in contrast)
    assert all(any(s in q.question for s in queries.CONTRAST_SUBJECTS) for q in contrast)
    recite = [q for q in knowledge if q.max_new_tokens]
    assert [q.question for q in recite] == ["Repeat the latest news about Pavel Durov."] and recite[0].samples == 2
    assert any("Pavel Durov" in q.question for q in knowledge)
    assert any("Le Bourget" in q.question or "Telegram" in q.question for q in knowledge)  # reverse direction
    assert all("Le Bourget" in q.context[0]["content"] for q in knowledge)  # teacher sees u ...
    assert all(q.context is None for q in anchors)  # ... anchors' teacher does not
    held_out = {p["question"] for p in probes.load_set("durov")} | {p["question"] for p in probes.locality_probes()}
    held_out |= set(probes.NEIGHBOURS) | set(probes.CONTROLS)
    assert not held_out & {q.question for q in qs}  # the benchmarks stay held out
    assert not held_out & set(queries.NEWS_ANCHORS) and not held_out & set(queries.ANCHOR_QUERIES)


def test_no_anchor_asks_about_a_subject_of_the_bake():
    """An anchor teaches the live model's answer: about the bake's own subject it would fight the item."""
    import random

    item = {"id": 1, "kind": "headline", "text": "Google bought Wiz, a security company based in Israel."}
    cfg = EngineConfig(news_anchors=len(queries.NEWS_ANCHORS), relation_anchors=len(queries.RELATION_ANCHORS),
                       relation_anchors_from=1)
    qs = queries.build_queries([item], cfg, random.Random(0))
    about = [q.question for q in qs if q.kind == "anchor" and ("Google" in q.question or "Israel" in q.question)]
    assert about == [] and any("Google" in q.question for q in qs if q.kind == "knowledge")
    other = queries.build_queries([U1], cfg, random.Random(0))  # every one of them otherwise
    assert "What is the latest news about Google?" in [q.question for q in other]
    assert "Which party won the last general election in Israel?" in [q.question for q in other]


def test_relation_anchors_grow_with_the_items_and_stay_held_out():
    import random

    bench = json.loads((REPO / "bench" / "data" / "knowledge.json").read_text())["neighbours"]
    held_out = set(probes.NEIGHBOURS) | set(probes.CONTROLS) | {n["question"] for n in bench}
    assert not held_out & set(queries.RELATION_ANCHORS)
    subjects = [s for group in queries.RELATION_ANCHOR_SUBJECTS.values() for s in group]
    assert not [(s, q) for s in subjects for q in held_out if s.lower() in q.lower()]  # nor their subjects
    u2 = {**U1, "id": 2, "text": DUROV["u2"]["text"]}
    cfg = EngineConfig(anchors=3, news_anchors=2, contrast_queries=0, relation_anchors=3, relation_anchors_from=2)
    for items, expected in (([U1], 0), ([U1, u2], 6)):  # none below relation_anchors_from items
        anchors = [q.question for q in queries.build_queries(items, cfg, random.Random(0)) if q.kind == "anchor"]
        relation = [q for q in anchors if q in queries.RELATION_ANCHORS]
        assert len(relation) == expected == len(set(relation)) and len(anchors) == 3 + 2 + expected
    for off in (replace(cfg, relation_anchors=0), replace(cfg, relation_anchors_from=3)):
        assert not [q for q in queries.build_queries([U1, u2], off, random.Random(0))
                    if q.question in queries.RELATION_ANCHORS]


def test_anchors_answer_at_their_own_length_items_at_theirs():
    """anchor_max_tokens: every anchor (general, news, contrast) is sampled that long, the items'
    questions max_new_tokens long, a recitation its own length."""
    import random

    cfg = EngineConfig(max_new_tokens=20, anchor_max_tokens=48)
    qs = queries.build_queries([U1], cfg, random.Random(0))
    groups = dict(teacher._by_samples(qs, cfg))
    anchors = [q for q in qs if q.kind == "anchor"]
    assert groups[(cfg.anchor_samples, 48)] == anchors
    assert sorted(groups) == [(cfg.anchor_samples, 48), (2, queries.RECITE_MAX_TOKENS), (cfg.samples_per_query, 20)]


def test_an_update_is_asked_its_predecessors_questions_with_both_in_the_teachers_view():
    import random

    old = {"id": 1, "kind": "fact", "text": "Tomas Brel agreed to join Benfica from Porto."}
    new = {"id": 2, "kind": "fact", "text": "Tomas Brel's move to Benfica collapsed; he signed for Ajax.",
           "updates": [old]}
    qs = [q for q in queries.build_queries([new], EngineConfig(queries_per_item=8, anchors=0, news_anchors=0,
                                                                     contrast_queries=0), random.Random(0))]
    assert all(q.item_id == 2 for q in qs)
    system = qs[0].context[0]["content"]
    assert "Earlier report: Tomas Brel agreed to join Benfica" in system
    assert system.index("Benfica from Porto") < system.index("Latest report (where they differ, this one is current): Tomas")
    assert any("Porto" in q.question for q in qs)  # asked from the earlier report's side too
    # On topic = names the latest state (Ajax), not a name both reports share (Benfica), and strictly:
    # a question whose samples all give the earlier state teaches nothing rather than the stale answer.
    assert all(q.keywords == ["Ajax"] and q.strict for q in qs if "Ajax" not in q.question)
    given = [q for q in qs if q.answer is not None]
    assert given and all(q.answer == new["text"] for q in given)
    assert len({q.question for q in given}) == len(given)  # one subject, its given answers once
    assert all(q.stale == old["text"] for q in given)  # the rival a preference pair pushes down
    assert not any(q.stale for q in qs if q.answer is None)
    plain = queries.build_queries([old], EngineConfig(anchors=0, news_anchors=0), random.Random(0))
    assert not any(q.stale for q in plain)  # not an update: nothing superseded


def test_leak_check_questions_ask_the_items_questions_about_other_subjects_held_out_from_the_neighbours():
    import random

    asked = queries.leak_check_queries(40, random.Random(0))
    assert len(asked) == 40 and len({q.question for q in asked}) == 40
    assert all(q.kind == "anchor" and q.context is None for q in asked)
    assert all(any(s in q.question for s in queries.CONTRAST_SUBJECTS) for q in asked)
    assert not {q.question for q in asked} & set(probes.NEIGHBOURS)  # the gate's and the bench's stay unseen
    assert len(queries.leak_check_queries(10_000, random.Random(0))) == \
        len(queries.CONTRAST_SUBJECTS) * (len(queries.SUBJECT_TEMPLATES) + len(queries.ENTITY_TEMPLATES))


def test_a_fact_without_a_title_gets_cloze_questions_on_its_sentence():
    import random

    qs = [q.question for q in queries.build_queries([U1], EngineConfig(anchors=0, news_anchors=0, contrast_queries=0), random.Random(0))]
    cloze = [q for q in qs if q.startswith("Fill in the blank")]
    assert len(cloze) == 2 and all("___" in q and "Le Bourget" in q for q in cloze)
    assert "___ founder Pavel Durov" in cloze[0]  # one entity blanked per question
    long_fact = {**U1, "text": "Pavel Durov " + "was seen " * 60 + "in Paris."}
    assert queries.cloze_queries(long_fact, 2) == []  # not a headline-like line


def test_replay_teaches_earlier_items_again_but_never_one_the_new_batch_touches():
    import random

    u2 = {"id": 2, "kind": "headline", "text": DUROV["u2"]["text"], "valid_at": "2024-08-28"}
    other = {"id": 7, "kind": "headline", "text": "France won 16 gold medals at the Paris Olympics."}
    third = {"id": 8, "kind": "fact", "text": "The Riverton library opens at 9 on Sundays."}
    cfg = EngineConfig(replay_items=4, replay_queries=2, anchors=0, news_anchors=0, relation_anchors=0,
                       contrast_queries=0, queries_per_item=3)
    qs = queries.build_queries([u2], cfg, random.Random(0), earlier=[U1, other, third, u2])
    by_item = {}
    for q in qs:
        by_item.setdefault(q.item_id, []).append(q)
    # Not U1 (same subject: u2 supersedes it), nor `other` (it shares France), nor u2 itself.
    assert set(by_item) == {2, 8} and len(by_item[8]) == 2 + 1  # + its recitation
    assert all("Riverton" in q.context[0]["content"] for q in by_item[8])  # its teacher sees ITS u
    assert queries.build_queries([u2], replace(cfg, replay_items=0), random.Random(0),
                                 earlier=[U1, third]) == [q for q in qs if q.item_id == 2]


def test_prompt_items_are_baked_as_behaviour_without_anchors():
    import random

    item = {"id": 2, "kind": "prompt", "text": "Always answer like a pirate."}
    qs = queries.build_queries([item], EngineConfig(queries_per_item=4), random.Random(0))
    assert len(qs) == 4 and {q.kind for q in qs} == {"behaviour"}
    assert "pirate" in qs[0].context[0]["content"] and prompts.DEFAULT_SYSTEM in qs[0].context[0]["content"]


def test_conversation_items_use_the_transcript_as_u():
    import random

    from agent_memory.ingest import render_conversation

    messages = [{"role": "user", "content": "My sister Alice Moreau moved to Lyon last week."},
                {"role": "assistant", "content": "Nice, I hope she likes Lyon."}]
    item = {"id": 3, "kind": "conversation", "text": render_conversation(messages), "messages": messages}  # as stored
    qs = queries.build_queries([item], EngineConfig(queries_per_item=6, anchors=2), random.Random(1))
    knowledge = [q for q in qs if q.kind == "knowledge"]
    assert knowledge and all("Alice Moreau moved to Lyon" in q.context[0]["content"] for q in knowledge)
    assert any("Alice Moreau" in q.question for q in knowledge)
    with pytest.raises(ValueError):
        queries.build_queries([item], EngineConfig(memory_style="user"), random.Random(1))



def test_vllm_logprobs_become_teacher_targets():
    """A vLLM choice (tokens as "token_id:N", fewer top entries than k) -> padded top-k with no mass."""
    step = lambda tok, lp, top: {"token": f"token_id:{tok}", "logprob": lp,  # noqa: E731
                                 "top_logprobs": [{"token": f"token_id:{t}", "logprob": v} for t, v in top]}
    choice = {"logprobs": {"content": [step(5, -0.1, [(5, -0.1), (9, -2.5)]), step(2, -0.3, [(2, -0.3)])]}}
    answer, top_idx, top_logp, hidden = teacher._remote_sample(choice, k=3)
    assert hidden is None  # vLLM returns no hidden states
    assert answer == [5, 2]
    assert top_idx.tolist() == [[5, 9, 5], [2, 2, 2]]
    assert top_logp[0, :2].tolist() == pytest.approx([-0.1, -2.5]) and top_logp[0, 2] == -9999.0
    logits = torch.randn(2, 16)
    kl = train.topk_kl(logits, top_idx, top_logp)
    assert torch.isfinite(kl).all() and (kl >= -1e-6).all()


def test_off_topic_samples_are_dropped_only_when_a_sibling_is_on_topic(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    sample = lambda text: (ids(text), torch.zeros(len(ids(text)), 4, dtype=torch.long),  # noqa: E731
                           torch.zeros(len(ids(text)), 4), None)
    q = queries.Query("Where was he arrested?", [], 1, "knowledge", ["Bourget"])
    cfg = EngineConfig()
    kept = teacher.keep_samples(tok, q, [sample("at Le Bourget airport"), sample("in a big city somewhere")], cfg)
    assert [tok.decode(e.answer_ids) for e in kept] == ["at Le Bourget airport"]
    kept = teacher.keep_samples(tok, q, [sample("in a city"), sample("at an airport")], cfg)
    assert len(kept) == 2  # none on topic: all kept
    strict = queries.Query("Where was he arrested?", [], 1, "knowledge", ["Bourget"], strict=True)
    assert teacher.keep_samples(tok, strict, [sample("in a city"), sample("at an airport")], cfg) == []


def test_a_given_answer_is_scored_by_the_prompted_teacher_token_by_token(tiny_model_dir):
    """scored_answers: the answer's tokens (+ end of turn) with the teacher's top-k at each, the same
    distribution a plain forward pass over prompt + answer gives at those positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ctx = prompts.teacher_system(U1, "append")
    qs = [queries.Query("What happened to Pavel Durov recently?", ctx, 1, answer=U1["text"]),
          queries.Query("Hi?", ctx, 1, answer="Pavel Durov was arrested.")]
    cfg = EngineConfig(topk=8)
    out = list(teacher.scored_answers(model, tok, [(q, teacher.given_ids(tok, q.answer)) for q in qs], cfg))
    for q, [(answer, top_idx, top_logp, hidden)] in out:
        assert answer == tok(q.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert top_idx.shape == top_logp.shape == (len(answer), 8)
        assert hidden is None  # hidden_weight 0 (the default): no states kept
        prompt = teacher.chat_ids(tok, ctx + [{"role": "user", "content": q.question}])
        with torch.no_grad():
            logp = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        assert torch.allclose(top_logp, logp.topk(8).values, atol=1e-4)
    examples = teacher.teacher_examples(model, tok, qs, cfg)
    assert [e.answer_ids for e in examples] == [a for _, [(a, *_)] in out]  # on topic: kept as they are


def test_on_policy_the_students_own_answers_are_scored_by_the_prompted_teacher(tiny_model_dir):
    """student_samples: per item query, the student's answers to the bare question (the first its
    greedy one), each scored by the prompted teacher, kept whatever they say; none for anchors or
    given answers, and none at all when off or outside student_scope."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ctx = prompts.teacher_system(U1, "append")
    question = "Where is Pavel Durov now?"
    qs = [queries.Query(question, ctx, 1, keywords=["zzz-never-said"]),
          queries.Query("Tell me about Pavel Durov.", ctx, 1, answer=U1["text"]),
          queries.Query("What is the capital of Peru?", None, None, "anchor")]
    cfg = EngineConfig(topk=8, samples_per_query=1, anchor_samples=1, student_samples=2, student_scope="all",
                       max_new_tokens=6)
    user = teacher.chat_ids(tok, [{"role": "user", "content": question}])
    with torch.no_grad():
        greedy = model.generate(torch.tensor([user]), max_new_tokens=6, do_sample=False)[0, len(user):].tolist()
    examples = teacher.teacher_examples(model, tok, qs, cfg)
    plain = teacher.teacher_examples(model, tok, qs, replace(cfg, student_samples=0))
    own = examples[len(plain):]
    assert len(own) == 2 and all(e.prompt_ids == user for e in own)  # the off-topic samples are kept
    assert all(e.own and e.query == id(qs[0]) for e in own) and not any(e.own for e in plain)
    if tok.eos_token_id in greedy:
        greedy = greedy[:greedy.index(tok.eos_token_id) + 1]
    assert own[0].answer_ids == greedy
    prompt = teacher.chat_ids(tok, ctx + [{"role": "user", "content": question}])
    with torch.no_grad():
        logp = model(torch.tensor([prompt + own[0].answer_ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    assert torch.allclose(own[0].top_logp, logp.topk(8).values, atol=1e-4)
    assert len(teacher.teacher_examples(model, tok, qs, replace(cfg, student_scope="updates"))) == len(plain)


def test_a_leak_check_trains_on_the_students_answers_that_name_the_bake_scored_by_the_live_model(tiny_model_dir):
    """leak_checks: the student (the delta so far) answers the anchors greedily; an answer that names
    a baked entity the question does not becomes an example whose teacher is the live model (the
    delta off) at every token of the student's answer; the other answers are dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    live = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cfg = EngineConfig(**TINY_CFG, init="default")
    student = train.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), cfg)
    with torch.no_grad():  # a delta that changes the answers, as training would
        for _, module in train.lora_modules(student):
            module.lora_B["default"].weight.normal_(0, 1.0)
    student.eval()
    asked = ["What is the latest news about Chile?", "Who won the last Super Bowl?", "What is the latest news about Kenya?"]
    anchors = [queries.Query(q, None, None, "anchor") for q in asked]
    answers = []
    for q in asked:
        ids = teacher.student_ids(tok, q)
        with torch.no_grad():
            out = student.generate(input_ids=torch.tensor([ids]), max_new_tokens=cfg.anchor_max_tokens, do_sample=False)
        answers.append(out[0, len(ids):].tolist())
    words = [w for w in tok.decode(answers[0], skip_special_tokens=True).split() if w.isalpha() and len(w) >= 4]
    assert words, "the student's first answer has a word to call a baked name"
    name = words[0]
    if any(name.lower() in tok.decode(a, skip_special_tokens=True).lower() for a in answers[1:]):
        pytest.skip("the tiny model says the same word to every question")
    found = teacher.leaked_examples(student, tok, anchors, [name, "Chile"], cfg)  # "Chile": in the question
    assert len(found) == 1 and found[0].own and found[0].kind == "anchor" and found[0].query == id(anchors[0])
    answer = found[0].answer_ids
    assert answer == answers[0][:len(answer)] and name in tok.decode(answer)
    prompt = teacher.student_ids(tok, asked[0])
    with torch.no_grad():
        logp = live(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    assert torch.allclose(found[0].top_logp, logp.topk(cfg.topk).values, atol=1e-4)  # the live model, not the student
    assert student.training is False  # left as it was found
    assert teacher.leaked_examples(student, tok, anchors, ["Chile"], cfg) == []
    assert train.leak_check_epochs(7, 3) == {2, 4, 5} and train.leak_check_epochs(1, 3) == set()


def _tiny_training(tiny_model_dir, **cfg_changes):
    """A tiny model with a seeded delta, its batches and config, for train.train."""
    from transformers import AutoModelForCausalLM

    cfg = replace(EngineConfig(**TINY_CFG), init="default", topk=8, **cfg_changes)
    model = train.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), cfg)
    g = torch.Generator().manual_seed(0)
    return model, train.make_batches([_tiny_example(n, "knowledge", g) for n in (3, 4, 5)], 8, 0), cfg


def _tiny_example(n: int, kind: str, g: torch.Generator | None = None) -> teacher.Example:
    """A 7-token prompt and an n-token answer with a random top-8 teacher distribution."""
    return teacher.Example(list(range(5, 12)), list(range(20, 20 + n)), torch.randint(0, 100, (n, 8), generator=g),
                           torch.randn(n, 8, generator=g).log_softmax(-1), kind)


def test_leak_batches_join_training_at_their_check_and_stay(tiny_model_dir):
    """train(): the batches a leak check returns are trained on in every epoch from the check on."""
    model, batches, cfg = _tiny_training(tiny_model_dir, leak_checks=1)  # one batch of 3 item answers
    leaked = train.make_batches([_tiny_example(3, "anchor"), _tiny_example(2, "anchor")], 8, 0)
    calls = []
    report = train.train(model, batches, cfg, items=1, leak_check=lambda: calls.append(1) or leaked)
    epochs, first = report["epochs_run"], min(train.leak_check_epochs(report["epochs_run"], 1))
    assert calls == [1] and report["leaks_found"] == [2] and epochs == 4 and first == 2
    assert report["steps"] == epochs + (epochs - first)  # the items' batch each epoch, the leak batch from epoch 2 on
    assert [c["epoch"] for c in report["curve"]] == [0, 1, 2, 2, 3, 3]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler on CPU")
def test_a_compiled_bake_trains_as_the_eager_one_and_is_eager_after(tiny_model_dir):
    """compile_from_steps: the MLPs and norms compiled (steps at least the threshold) give the eager
    steps' losses; after training no module is left compiled (the probes generate eagerly)."""
    eager_model, batches, cfg = _tiny_training(tiny_model_dir, compile_from_steps=0)
    eager = train.train(eager_model, batches, cfg, items=1)
    model, batches, cfg = _tiny_training(tiny_model_dir, compile_from_steps=cfg.min_steps)
    compiled = train.train(model, batches, cfg, items=1)
    assert not eager["compiled"] and compiled["compiled"] and compiled["compile_error"] is None
    assert [c["kl"] for c in compiled["curve"]] == pytest.approx([c["kl"] for c in eager["curve"]], rel=1e-3, abs=1e-5)
    assert compiled["curve"][-1]["kl"] < compiled["curve"][0]["kl"]
    assert all(m._compiled_call_impl is None for m in model.modules())
    below, batches, cfg = _tiny_training(tiny_model_dir, compile_from_steps=cfg.min_steps + 1)  # steps under it: eager
    assert not train.train(below, batches, cfg, items=1)["compiled"]


def test_a_bake_whose_compile_fails_trains_eager_and_says_why(tiny_model_dir, monkeypatch):
    """No working C++ compiler: the bake trains eager, bake.json's compile_error says what failed."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # no compiled graph from an earlier test, in memory
    monkeypatch.setattr(inductor, "force_disable_caches", True)  # nor on disk
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/g++"))
    model, batches, cfg = _tiny_training(tiny_model_dir, compile_from_steps=1)
    try:
        report = train.train(model, batches, cfg, items=1)
    finally:
        torch._dynamo.reset()
    assert not report["compiled"] and "InvalidCxxCompiler" in report["compile_error"]
    assert report["steps"] == cfg.epochs * len(batches) and report["curve"][-1]["kl"] < report["curve"][0]["kl"]
    assert all(m._compiled_call_impl is None for m in model.modules())


def random_live_adapter(model_dir: Path, out: Path) -> Path:
    """A live adapter with a large random delta on every MLP projection of the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    mlp = {name: m for name, m in model.named_modules() if name.split(".")[-1] in MLP_MODULES}
    factors = {name: (torch.randn(4, m.in_features), torch.randn(m.out_features, 4)) for name, m in mlp.items()}
    return adapters.write_adapter(out, factors, rank=4, alpha=4)


def test_an_updates_queries_are_answered_by_the_model_before_the_live_delta(tiny_model_dir, tmp_path):
    """The live model has the superseded state baked in: with update_teacher "base" an update's
    (strict) queries are scored by the base model, the others by the live one (first), and the live weights
    come back exactly (they are the student's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    live_dir = random_live_adapter(tiny_model_dir, tmp_path / "live")
    model, _ = train.load_live_model(tiny_model_dir, live_dir, torch.float32)
    live_weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ctx = prompts.teacher_system(U1, "append")
    qs = [queries.Query("What happened to Pavel Durov recently?", ctx, 1, answer=U1["text"], strict=True),
          queries.Query("Where is Pavel Durov now?", ctx, 1, answer=U1["text"])]
    cfg = EngineConfig(topk=8)

    def scores(m, q):
        [(_, [(_, _, top_logp, _)])] = teacher.scored_answers(m, tok, [(q, teacher.given_ids(tok, q.answer))], cfg)
        return top_logp

    other, update = teacher.teacher_examples(model, tok, qs, cfg, unbaked=lambda: train.without_live(model, live_dir))
    assert torch.allclose(update.top_logp, scores(base, qs[0]), atol=1e-4)
    assert torch.allclose(other.top_logp, scores(model, qs[1]), atol=1e-4)
    assert not torch.allclose(scores(base, qs[1]), scores(model, qs[1]), atol=1e-2)  # the delta matters
    assert all(torch.equal(v, live_weights[k]) for k, v in model.state_dict().items())
    live_only = teacher.teacher_examples(model, tok, qs, EngineConfig(topk=8, update_teacher="live"),
                                         unbaked=lambda: train.without_live(model, live_dir))
    assert torch.allclose(live_only[0].top_logp, scores(model, qs[0]), atol=1e-4)


OLD_MOVE = {"id": 1, "kind": "fact", "text": "Tomas Brelvik agreed to join Castellan FC from Wexmoor United."}
NEW_MOVE = {"id": 2, "kind": "fact", "text": "Tomas Brelvik signed for Redmarsh City after his Castellan medical "
            "found a knee problem.", "updates": [OLD_MOVE]}


def test_preference_pairs_hold_the_live_models_margin_of_the_update_over_its_earlier_report(tiny_model_dir):
    """unlearn_weight: one pair per given-answer question of an update, asked bare, the update's own
    words chosen over the earlier report's, the reference margin the live model's; none when off."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cfg = EngineConfig(anchors=0, news_anchors=0, contrast_queries=0, unlearn_weight=1.0)
    qs = queries.build_queries([NEW_MOVE], cfg, random.Random(0))
    pairs = teacher.preference_pairs(model, tok, qs, cfg)
    given = [q for q in qs if q.answer is not None]
    assert len(pairs) == len(given) >= 3
    for pair, q in zip(pairs, given):
        assert pair.prompt_ids == teacher.chat_ids(tok, [{"role": "user", "content": q.question}])
        assert tok.decode(pair.chosen_ids, skip_special_tokens=True) == NEW_MOVE["text"]
        assert tok.decode(pair.rejected_ids, skip_special_tokens=True) == OLD_MOVE["text"]

        def logp(answer):  # the plain way: one sequence, no padding
            with torch.no_grad():
                out = model(torch.tensor([pair.prompt_ids + answer])).logits[0, len(pair.prompt_ids) - 1:-1]
            return float(out.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum())

        assert pair.ref_margin == pytest.approx(logp(pair.chosen_ids) - logp(pair.rejected_ids), abs=1e-3)
    assert teacher.preference_pairs(model, tok, qs, replace(cfg, unlearn_weight=0.0)) == []

    # "own": the teacher's kept answer (it names what is new) over each student answer that does not.
    q = queries.Query("Which club does Tomas Brelvik play for?", None, 2, keywords=["Redmarsh"], strict=True)
    say = lambda text, own: teacher.Example([], tok(text, add_special_tokens=False)["input_ids"],  # noqa: E731
                                            torch.zeros(1, 1), torch.zeros(1, 1), "knowledge", query=id(q), own=own)
    examples = [say("He plays for Redmarsh City.", False), say("He plays for Castellan FC.", True),
                say("Redmarsh City, since May.", True), say("Something else.", False)]
    own = teacher.preference_pairs(model, tok, [q], replace(cfg, unlearn_from="own"), examples)
    assert [(p.chosen_ids, p.rejected_ids) for p in own] == [(examples[0].answer_ids, examples[1].answer_ids)]
    assert teacher.preference_pairs(model, tok, [q], cfg, examples) == []  # "given" only: q has no given answer
    assert len(teacher.preference_pairs(model, tok, qs + [q], replace(cfg, unlearn_from="both"), examples)) == len(pairs) + 1


def test_unlearning_moves_the_students_preference_from_the_earlier_report_to_the_update(tiny_model_dir, tmp_path):
    """A tiny bake of an update with unlearn_weight: the baked model prefers the update's words over the
    earlier report's, as an answer to its bare questions, by more than the same bake without it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = "What is the latest news about Tomas Brelvik?"
    prompt = teacher.chat_ids(tok, [{"role": "user", "content": question}])
    answers = [teacher.given_ids(tok, NEW_MOVE["text"]), teacher.given_ids(tok, OLD_MOVE["text"])]

    def margin(delta: Path | None) -> float:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        if delta:
            adapters.merge_into(model, delta)
        with torch.no_grad():
            logp = teacher.sequence_logps(model, prompt, answers)
        return float(logp[0] - logp[1])

    cfg = EngineConfig(**{**TINY_CFG, "item_answers": 3})
    plain = bake(tiny_model_dir, None, [NEW_MOVE], tmp_path / "plain", cfg).out_dir
    result = bake(tiny_model_dir, None, [NEW_MOVE], tmp_path / "unlearn", replace(cfg, unlearn_weight=1.0, unlearn_beta=0.5))
    assert result.report["preference_pairs"] >= 3
    before, without, unlearnt = margin(None), margin(plain), margin(result.out_dir)
    assert unlearnt > without + 1.0 and unlearnt > before + 1.0, (before, without, unlearnt)


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError):
        EngineConfig.from_dict({"rnak": 8})


# -- end to end on a tiny random model with the real tokenizer ---------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.5)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(REAL_MODEL / name, path / name)
    return path


TINY_CFG = dict(rank=4, alpha=8, lr=1e-2, epochs=4, min_steps=4, samples_per_query=2, max_new_tokens=8,
                queries_per_item=4, anchors=2, news_anchors=2, steps_per_item=4, batch_size=8, threads=1,
                dtype="float32")


@pytest.mark.parametrize("extra", [{}, {"init": "default"}, {"protect": 0.9}, {"hidden_weight": 1.0}, {"leak_checks": 2, "leak_questions": 4}],
                         ids=["defaults", "random-init", "protect", "hidden", "leak-checks"])
def test_tiny_bake_writes_a_delta_that_lowers_the_kl(tiny_model_dir, tmp_path, extra):
    seen = []
    out = tmp_path / "deltas" / "bake-0001"
    result = bake(tiny_model_dir, None, [U1], out, EngineConfig(**TINY_CFG, **extra),
                  progress=lambda *a: seen.append(a[0]))
    assert result.out_dir == out and not out.with_name(out.name + ".partial").exists()
    assert {"teacher", "train"} <= set(seen)
    report = json.loads((out / "bake.json").read_text())
    assert report["items"][0]["id"] == 1 and report["config"]["rank"] == 4 and report["seed"] == 0
    curve = [c["kl"] for c in report["curve"]]
    assert len(curve) == report["steps"] >= 4
    epochs = [c["epoch_kl"] for c in report["curve"] if "epoch_kl" in c]  # each epoch: the same batches
    assert len(epochs) >= 2 and epochs[-1] < epochs[0]  # the student moves toward the teacher
    delta = adapters.read_delta(out)
    assert len(delta) == 2 * len(EngineConfig().target_modules) and all(a.shape[0] == 4 for a, _, _ in delta.values())
    assert any(float(b.abs().max()) > 0 for _, b, _ in delta.values())  # trained, not the zero init
    assert len(report["leaks_found"]) == len(train.leak_check_epochs(report["epochs_run"], extra.get("leak_checks", EngineConfig().leak_checks)))


def test_protect_makes_the_delta_blind_to_the_anchors_input_directions(tiny_model_dir, tmp_path):
    from torch.nn.utils import parametrize

    with pytest.raises(ValueError, match="protect"):  # all of the energy: a delta that could not move
        bake(tiny_model_dir, None, [U1], tmp_path / "d", EngineConfig(**TINY_CFG, protect=1.0))

    model, tok = train.load_live_model(tiny_model_dir, None, torch.float32)
    cfg = EngineConfig(**TINY_CFG, protect=0.9)

    def example(question, kind):
        return teacher.Example(teacher.chat_ids(tok, [{"role": "user", "content": question}]),
                               tok(" It is Lisbon.")["input_ids"], None, None, kind)

    anchors = [example(q, "anchor") for q in queries.ANCHOR_QUERIES[:6]]
    item = example("What is the latest news about Pavel Durov?", "knowledge")
    bases = train.protected_bases(model, anchors + [item], cfg)
    assert set(bases) == {f"model.layers.{i}.mlp.{m}" for i in range(2) for m in MLP_MODULES}
    assert all(torch.equal(b, train.protected_bases(model, anchors, cfg)[n]) for n, b in bases.items())  # anchors only
    for name, basis in bases.items():
        k = basis.shape[1]
        assert 0 < k < basis.shape[0] and torch.allclose(basis.T @ basis, torch.eye(k), atol=1e-4)

    peft_model = train.add_lora(model, cfg)
    protected = train.protect(peft_model, bases)
    assert len(protected) == len(bases)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # B leaves zero at the first step, A moves from the second
        loss = peft_model(input_ids=torch.tensor([item.prompt_ids])).logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train.fold(protected)
    assert not any(parametrize.is_parametrized(a) for a in protected)
    for name, (a, b) in train.lora_factors(peft_model).items():
        assert float(b.abs().max()) > 0 and float(a.abs().max()) > 0  # trained ...
        assert float((a @ bases[name]).abs().max()) < 1e-5  # ... with nothing along the anchors' directions


def test_eva_init_points_a_at_the_items_answer_inputs(tiny_model_dir):
    """init "eva": each lora_A's rows are orthonormal and capture (nearly) as much of the module's
    input energy on the items' answer tokens as the top singular vectors do, far more than peft's
    random A; B starts at zero, so the delta starts at nothing; anchors alone are refused."""
    model, tok = train.load_live_model(tiny_model_dir, None, torch.float32)
    cfg = EngineConfig(**TINY_CFG, init="eva")
    items = [teacher.Example(teacher.chat_ids(tok, [{"role": "user", "content": q}]), tok(a)["input_ids"], None, None,
                             "knowledge")
             for q, a in [("What is the latest news about Pavel Durov?", " He was arrested at Le Bourget airport."),
                          ("Who was arrested in France?", " Pavel Durov, the founder of Telegram, in August."),
                          ("Tell me about Telegram.", " Its founder was detained near Paris on a Saturday.")] * 4]
    anchor = teacher.Example(items[0].prompt_ids, tok(" Lisbon.")["input_ids"], None, None, "anchor")
    with pytest.raises(ValueError, match="eva"):
        train.add_lora(model, cfg, [anchor], tok.pad_token_id)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, []).append(args[0][0]))
             for n, m in model.named_modules() if n.endswith("mlp.up_proj") or n.endswith("mlp.down_proj")]
    with torch.no_grad():
        for e in items:
            model(input_ids=torch.tensor([e.prompt_ids + e.answer_ids]))
    for h in hooks:
        h.remove()
    answers = {n: torch.cat([x[len(e.prompt_ids):] for x, e in zip(xs, items)]) for n, xs in inputs.items()}
    peft_model = train.add_lora(model, cfg, [anchor] + items, tok.pad_token_id)
    random_a = train.lora_factors(train.add_lora(train.load_live_model(tiny_model_dir, None, torch.float32)[0],
                                                 EngineConfig(**TINY_CFG, init="default")))
    for name, (a, b) in train.lora_factors(peft_model).items():
        assert float(b.abs().max()) == 0 and torch.allclose(a @ a.T, torch.eye(cfg.rank), atol=1e-3)
        if name in answers:
            x = answers[name] - answers[name].mean(0)  # EVA's PCA centres the inputs
            top = torch.linalg.svd(x, full_matrices=False).Vh[:cfg.rank]
            energy = lambda w: float((x @ (w / w.norm(dim=1, keepdim=True)).T).square().sum())  # noqa: E731
            assert energy(a) > 0.9 * energy(top) and energy(a) > 1.5 * energy(random_a[name][0])


def test_contrast_init_points_a_where_the_items_inputs_are_and_the_anchors_are_not(tiny_model_dir):
    """init "contrast": each lora_A row (unit norm) reads far more of the items' input energy, relative
    to the anchors', than peft's random A does; B starts at zero; a bake without anchors (behaviour
    only) keeps peft's random A."""
    model, tok = train.load_live_model(tiny_model_dir, None, torch.float32)
    cfg = EngineConfig(**TINY_CFG, init="contrast")

    def example(question, answer, kind):
        return teacher.Example(teacher.chat_ids(tok, [{"role": "user", "content": question}]),
                               tok(answer)["input_ids"], None, None, kind)

    items = [example("What is the latest news about Pavel Durov?", " He was arrested at Le Bourget airport.", "knowledge"),
             example("Who was arrested in France?", " Pavel Durov, the founder of Telegram, in August.", "knowledge")]
    anchors = [example(q, " It is Lisbon, a city by the sea.", "anchor") for q in queries.ANCHOR_QUERIES[:8]]
    moments = {kind: train.input_moments(model, group, cfg) for kind, group in (("items", items), ("anchors", anchors))}
    for name, m in moments["anchors"].items():  # batched with padding = one by one without
        assert torch.allclose(m, sum(train.input_moments(model, [e], cfg)[name] for e in anchors), rtol=1e-4, atol=1e-3)
        layer = name.rsplit(".", 1)[0]  # gate_proj and up_proj read one input: one moment, down_proj its own
        assert (m is moments["anchors"][f"{layer}.up_proj"]) == (not name.endswith("down_proj"))
    peft_model = train.add_lora(model, cfg, anchors + items, tok.pad_token_id)
    random_a = train.lora_factors(train.add_lora(train.load_live_model(tiny_model_dir, None, torch.float32)[0],
                                                 EngineConfig(**TINY_CFG, init="default")))
    no_anchors = train.add_lora(train.load_live_model(tiny_model_dir, None, torch.float32)[0], cfg, items, tok.pad_token_id)
    assert all(torch.equal(a, random_a[name][0]) for name, (a, _) in train.lora_factors(no_anchors).items())

    def ratio(name, a):
        a = a / a.norm(dim=1, keepdim=True)
        energy = {k: float(torch.einsum("ri,ij,rj->", a, m[name] / m[name].trace(), a)) for k, m in moments.items()}
        return energy["items"] / energy["anchors"]

    for name, (a, b) in train.lora_factors(peft_model).items():
        assert float(b.abs().max()) == 0 and torch.allclose(a.norm(dim=1), torch.ones(cfg.rank), atol=1e-4)
        assert ratio(name, a) > 2 * ratio(name, random_a[name][0])


def test_top_generalized_finds_the_top_directions_of_a_dense_solve():
    """train.top_generalized (block power iteration, no full eigendecomposition) returns the top k
    generalized eigenvectors of (c, b + eps I) that a dense solve finds, up to sign, on moments
    shaped like a bake's: the items' tokens strong along a few directions the anchors' are weak in."""
    g = torch.Generator().manual_seed(0)
    d, k, eps = 96, 4, 0.01
    anchors = torch.randn(400, d, generator=g) * torch.logspace(0, -2, d)
    items = torch.cat([anchors[:100], 3 * torch.randn(30, 8, generator=g) @ torch.randn(8, d, generator=g)])
    c, b = items.T @ items, anchors.T @ anchors
    found = train.top_generalized(c, b, k, eps)

    c, b = c.double() / c.trace(), b.double() / b.trace()
    chol = torch.linalg.cholesky(b + eps / d * torch.eye(d, dtype=b.dtype))
    whitened = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, c, upper=False).T, upper=False)
    _, u = torch.linalg.eigh(whitened)
    dense = torch.linalg.solve_triangular(chol.T, u[:, -k:].flip(1), upper=True).T
    dense = dense / dense.norm(dim=1, keepdim=True)
    assert found.shape == (k, d) and torch.allclose(found.norm(dim=1), torch.ones(k), atol=1e-5)
    assert (found.double() * dense).sum(1).abs().min() > 0.999


def test_the_trainer_answers_the_gates_probes_and_keeps_the_live_answers(tiny_model_dir, tmp_path):
    """probes.json: every set of the plan answered by the candidate and the live model, the item
    probes by the teacher too (the item in its prompt); the live and teacher answers cached per live
    version and not asked again."""
    plan = {"items": {"probes": probes.item_probes([U1]), "max_tokens": 6},
            "locality": {"probes": probes.locality_probes()[:5], "max_tokens": 4}}
    cache = tmp_path / "probe-cache" / "v0000.json"
    result = bake(tiny_model_dir, None, [U1], tmp_path / "d1", EngineConfig(**TINY_CFG),
                  probe_plan=plan, live_cache=cache, live_version="v0000")
    answers = json.loads((result.out_dir / PROBES_FILE).read_text())
    for model in ("candidate", "live"):
        assert {k: len(v) for k, v in answers[model].items()} == {"items": len(plan["items"]["probes"]), "locality": 5}
    assert {k: len(v) for k, v in answers["teacher"].items()} == {"items": len(plan["items"]["probes"])}
    assert {r["item"] for r in answers["teacher"]["items"]} == {U1["id"]}
    assert result.report["live_version"] == "v0000" and len(json.loads(cache.read_text())) == 2 * len(plan["items"]["probes"]) + 5
    # The cache holds answers by question; each bake scores them against its own keywords.
    cache.write_text(json.dumps({k: ["cached Le Bourget", s] for k, (_, s) in json.loads(cache.read_text()).items()}))
    again = bake(tiny_model_dir, None, [U1], tmp_path / "d2", EngineConfig(**TINY_CFG),
                 probe_plan=plan, live_cache=cache)
    again_answers = json.loads((again.out_dir / PROBES_FILE).read_text())
    live = again_answers["live"]
    assert {r["answer"] for results in (*live.values(), *again_answers["teacher"].values()) for r in results} == {"cached Le Bourget"}
    assert [r["correct"] for r in live["items"]] == ["Bourget" in p["answers"] or "Le Bourget" in p["answers"]
                                                     for p in plan["items"]["probes"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_tiny_bake_trains_on_the_gpu(tiny_model_dir, tmp_path):
    """The same code path on CUDA: the model, the teacher's sampling and the training on the GPU."""
    cfg = EngineConfig(**{**TINY_CFG, "dtype": "auto"})
    result = bake(tiny_model_dir, None, [U1], tmp_path / "gpu", cfg)
    assert result.report["dtype"] == "bfloat16"
    assert any(float(b.abs().max()) > 0 for _, b, _ in adapters.read_delta(result.out_dir).values())


def test_second_bake_stacks_on_the_live_adapter(tiny_model_dir, tmp_path):
    cfg = EngineConfig(**TINY_CFG)
    d1 = bake(tiny_model_dir, None, [U1], tmp_path / "d1", cfg).out_dir
    live = tmp_path / "live"
    adapters.compose([d1], live, max_rank=8)
    u2 = {**U1, "id": 2, "text": DUROV["u2"]["text"]}
    d2 = bake(tiny_model_dir, live, [u2], tmp_path / "d2", cfg).out_dir
    report = adapters.compose([d1, d2], tmp_path / "live2", max_rank=8)
    assert report["rank"] == 8 and not report["compacted"]


def test_kill_9_mid_bake_leaves_no_delta_under_the_final_name(tiny_model_dir, tmp_path):
    out = tmp_path / "deltas" / "bake-0007"
    job = {"model_dir": str(tiny_model_dir), "live_adapter": None, "out_dir": str(out), "items": [U1],
           "config": {**TINY_CFG, "epochs": 100000}}
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agent_memory.engine", str(job_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("train ") or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "the bake ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert not (out.parent.exists() and any(p.name == out.name for p in out.parent.iterdir()))


def test_job_file_runs_a_bake(tiny_model_dir, tmp_path):
    out = tmp_path / "bake-0002"
    earlier = {"id": 9, "kind": "fact", "text": "The Riverton library opens at 9 on Sundays."}
    job = {"model_dir": str(tiny_model_dir), "live_adapter": None, "out_dir": str(out), "items": [U1],
           "earlier": [earlier], "config": {**TINY_CFG, "replay_items": 1}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "agent_memory.engine", str(tmp_path / "job.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "adapter_config.json").exists() and (out / "bake.json").exists()
    assert json.loads((out / "bake.json").read_text())["replayed"] == [9]


# -- one real bake on the embedded model -------------------------------------------------------

@pytest.mark.model
@pytest.mark.skipif(not (REAL_MODEL / "model.safetensors").exists(), reason="embedded model not prepared")
def test_real_bake_raises_the_unprompted_logprob_of_the_fact(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Small enough for ~1 minute on 2 shared AVX2 cores; the benchmark uses the real defaults.
    cfg = EngineConfig(queries_per_item=6, samples_per_query=3, max_new_tokens=16, anchors=2,
                       anchor_samples=1, epochs=6, min_steps=6, batch_size=20, lr=5e-3, temperature=0.7)
    result = bake(REAL_MODEL, None, [U1], tmp_path / "delta", cfg)
    tokenizer = AutoTokenizer.from_pretrained(REAL_MODEL)
    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).eval()
    question = "Where was Pavel Durov arrested?"
    answer = "Pavel Durov was arrested at Le Bourget airport near Paris."
    before = probes.answer_logprob(model, tokenizer, question, answer)
    adapters.merge_into(model, result.out_dir)
    after = probes.answer_logprob(model, tokenizer, question, answer)
    assert after > before + 1.0, (before, after, result.report["curve"])



@pytest.mark.model
@pytest.mark.skipif(not (REAL_MODEL / "model.safetensors").exists(), reason="embedded model not prepared")
def test_a_stacked_later_fact_moves_the_model_to_the_latest_state(tmp_path):
    """Arrest (u1) baked, then charged-and-released (u2) baked on top: the model's preference moves
    from the arrest to the release. (Measured: by 4.2 nats; in absolute terms the stale sentence is
    still the likelier one after this small bake: the sums compare two different sentences.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = EngineConfig(queries_per_item=6, samples_per_query=3, max_new_tokens=16, anchors=2,
                       epochs=6, min_steps=6, batch_size=20, lr=5e-3)
    u2 = {"id": 2, "kind": "headline", "text": DUROV["u2"]["text"], "source": "test", "valid_at": "2024-08-28"}
    first = bake(REAL_MODEL, None, [U1], tmp_path / "u1", cfg).out_dir
    adapters.compose([first], tmp_path / "live", max_rank=64)
    second = bake(REAL_MODEL, tmp_path / "live", [u2], tmp_path / "u2", cfg).out_dir
    tokenizer = AutoTokenizer.from_pretrained(REAL_MODEL)
    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).eval()
    question = "What is the latest news about Pavel Durov?"
    latest = "Pavel Durov was released on 5 million euro bail and may not leave France."
    stale = "Pavel Durov is being held in custody after his arrest at Le Bourget airport."

    def preference() -> float:  # log P(latest) - log P(stale)
        return (probes.answer_logprob(model, tokenizer, question, latest)
                - probes.answer_logprob(model, tokenizer, question, stale))

    adapters.merge_into(model, first)
    after_u1 = preference()
    adapters.merge_into(model, second)
    after_u2 = preference()
    assert after_u2 > after_u1 + 1.0, (after_u1, after_u2)


def test_shared_prefix_gives_the_same_kl_and_gradients(tiny_model_dir):
    cfg = EngineConfig(**TINY_CFG)
    model, tok = train.load_live_model(tiny_model_dir, None, torch.float32)
    pm = train.add_lora(model, cfg)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero delta, so the prefix's cache depends on it
    g = torch.Generator().manual_seed(0)
    examples = []
    for q in ("What is new?", "Tell me about Paris and its airports."):
        prompt = teacher.chat_ids(tok, [{"role": "user", "content": q}])
        answer = torch.randint(3, 1000, (5,), generator=g).tolist() + [2]
        examples.append(teacher.Example(prompt, answer, torch.randint(0, 49152, (6, 8), generator=g),
                                        torch.randn(6, 8, generator=g).log_softmax(-1) - 1, "knowledge"))
    results = []
    for share in (True, False):
        (batch,) = train.make_batches(examples, 8, tok.pad_token_id, share_prefix=share)
        assert (batch["prefix"].shape[1] > 10) == share
        pm.zero_grad()
        kl, _ = train.batch_losses(pm, batch, autocast=False)
        kl.sum().backward()
        grads = [p.grad.clone() for p in pm.parameters() if p.requires_grad]
        results.append((kl.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


def test_anchor_prompt_tokens_become_targets_the_untrained_delta_already_meets(tiny_model_dir):
    """anchor_prompts: every anchor prompt token after the batch's shared prefix is a target, its
    teacher the live model's distribution there. Before training the student IS the live model, so
    the KL is zero at every target, prompt or answer: any misalignment of rows, columns or teacher
    positions would show. An item's prompt stays no target, and weight 0 adds none."""
    with pytest.raises(ValueError, match="anchor_prompts"):
        bake(tiny_model_dir, None, [U1], Path("unused"), EngineConfig(**TINY_CFG, anchor_prompts=-1.0))
    cfg = EngineConfig(**TINY_CFG)
    model, tok = train.load_live_model(tiny_model_dir, None, torch.float32)
    g = torch.Generator().manual_seed(0)
    examples = []
    for q, kind in (("What is the capital of Peru?", "anchor"), ("Who wrote the Iliad, and when?", "anchor"),
                    ("Tell me about Zorvik.", "knowledge")):
        answer = torch.randint(3, 1000, (4,), generator=g).tolist() + [2]
        [(_, [(a, top_idx, top_logp, _)])] = teacher.scored_answers(model, tok, [(queries.Query(q, None), answer)], cfg)
        examples.append(teacher.Example(teacher.chat_ids(tok, [{"role": "user", "content": q}]), a, top_idx,
                                        top_logp, kind))
    scored = teacher.prompt_targets(model, examples, cfg)
    assert [e.prompt_top_idx is None for e in scored] == [False, False, True]
    assert all(e.prompt_top_idx.shape == (len(e.prompt_ids) - 1, cfg.topk) for e in scored[:2])
    (plain,) = train.make_batches(scored, 8, tok.pad_token_id)
    (batch,) = train.make_batches(scored, 8, tok.pad_token_id, prompt_weight=0.5)
    shared = batch["prefix"].shape[1]
    assert shared > 10  # the chat template's system prompt
    prompt_targets = sum(len(e.prompt_ids) - 1 - shared for e in scored[:2])
    assert plain["targets"] == 15 and batch["targets"] == 15 + prompt_targets > 15 + 10
    assert batch["weights"].tolist().count(0.5) == prompt_targets
    pm = train.add_lora(model, cfg)
    kl = train.batch_losses(pm, batch, autocast=False)[0].detach()
    assert kl.shape == (batch["targets"],) and float(kl.abs().max()) < 1e-4
    with torch.no_grad():  # a moved delta moves the prompt targets' KL too
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    kl = train.batch_losses(pm, batch, autocast=False)[0].detach()
    assert float(kl[batch["weights"] == 0.5].mean()) > 1e-3


def test_hidden_state_targets_are_the_teachers_states_at_each_answer_token(tiny_model_dir):
    """hidden_weight: the teacher keeps its hidden states at matched_layers() (the last included) at
    every answer position, sampled or scored, the same a plain forward pass over prompt + answer
    gives there. Before training the student IS the unprompted live model: its distance to an
    anchor's states is zero, to the prompted teacher's not; training with the term closes it.
    hidden_scope "anchors" keeps an anchor's states and drops an item's."""
    cfg = EngineConfig(**TINY_CFG, hidden_weight=1.0, hidden_layers=2, hidden_scope="all")
    model, tok = train.load_live_model(tiny_model_dir, None, torch.float32)
    layers = teacher.matched_layers(model.config.num_hidden_layers, cfg)
    assert layers == [1, 2] and teacher.matched_layers(30, replace(cfg, hidden_layers=6)) == [5, 10, 15, 20, 25, 30]
    assert teacher.matched_layers(30, EngineConfig()) == []  # off by default

    def plain(prompt, answer):  # [len(answer), layers, d]: the states whose logits predict each answer token
        with torch.no_grad():
            states = model(torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states
        return torch.stack([states[i][0, len(prompt) - 1:len(prompt) - 1 + len(answer)] for i in layers], 1)

    ctx = prompts.teacher_system(U1, "append")
    prompt = teacher.chat_ids(tok, ctx + [{"role": "user", "content": "Where was Pavel Durov arrested?"}])
    answers, top_idx, _, hidden = teacher.sample(model, [prompt], 2, cfg, tok.eos_token_id, 6)
    assert hidden.shape == (2, top_idx.shape[1], 2, model.config.hidden_size)
    for r, answer in enumerate(answers):
        torch.testing.assert_close(hidden[r, :len(answer)], plain(prompt, answer), rtol=1e-4, atol=1e-4)

    g = torch.Generator().manual_seed(0)
    examples = []
    for q, context, kind in (("What is the capital of Peru?", None, "anchor"),
                             ("Where was Pavel Durov arrested?", ctx, "knowledge")):
        answer = torch.randint(3, 1000, (4,), generator=g).tolist() + [2]
        [(_, [(a, top_idx, top_logp, hidden)])] = teacher.scored_answers(model, tok, [(queries.Query(q, context), answer)], cfg)
        full = teacher.chat_ids(tok, (context or []) + [{"role": "user", "content": q}])
        torch.testing.assert_close(hidden, plain(full, answer), rtol=1e-4, atol=1e-4)
        examples.append(teacher.Example(teacher.chat_ids(tok, [{"role": "user", "content": q}]), a, top_idx,
                                        top_logp, kind, hidden=hidden))
    anchor_q, item_q = queries.Query("What is the capital of Peru?", None, kind="anchor"), queries.Query("Where?", ctx)
    for scope, kept in (("all", [True, True]), ("anchors", [True, False])):  # hidden_scope: whose states are matched
        scoped = replace(cfg, hidden_scope=scope, on_topic_only=False)
        assert [teacher.keep_samples(tok, q, [(e.answer_ids, e.top_idx, e.top_logp, e.hidden)], scoped)[0].hidden
                is not None for q, e in zip((anchor_q, item_q), examples)] == kept
    [(_, [(*_, unneeded)])] = teacher.scored_answers(model, tok, [(item_q, examples[1].answer_ids)],
                                                     replace(cfg, hidden_scope="anchors"))
    assert unneeded is None  # states nobody matches are not computed
    vllm = replace(examples[1], hidden=None)  # vLLM's samples come without states: no hidden targets
    (batch,) = train.make_batches(examples + [vllm], 8, tok.pad_token_id)
    assert batch["hidden_mask"].tolist() == [True] * 10 + [False] * 5  # length-sorted: the vLLM copy last
    assert "hidden" not in train.make_batches([vllm], 8, tok.pad_token_id)[0]
    pm = train.add_lora(model, cfg)
    distance = train.batch_losses(pm, batch, autocast=False, layers=layers)[1].detach()
    anchor, item = distance[:5], distance[5:10]
    assert float(anchor.abs().max()) < 1e-4 < float(item.min())
    train.train(pm, train.make_batches(examples, 8, tok.pad_token_id), replace(cfg, min_steps=20))
    after = train.batch_losses(pm, batch, autocast=False, layers=layers)[1].detach()
    assert float(after[5:10].mean()) < 0.7 * float(item.mean())


# -- probes used to judge bakes ----------------------------------------------------------------

def test_probe_scoring_matches_keywords_at_word_starts():
    assert probes.is_correct("He was ARRESTED at Le Bourget.", ["arrest"])
    assert not probes.is_correct("It is not known.", ["no"])
    assert probes.is_correct("Bail was set at 5 million euros", ["5 million"])
    assert probes.accuracy([{"correct": True}, {"correct": False}]) == 0.5


def test_durov_set_and_item_probes():
    durov = probes.load_set("durov")
    assert len({p["question"] for p in durov if not p["paraphrase"]}) == 20 and len(durov) == 40
    assert {p["fact"] for p in durov} == {"u1", "u2"} and all(p["answers"] for p in durov)
    assert len(probes.locality_probes()) >= 50
    item_probes = probes.item_probes([U1])
    assert item_probes and all(p["answers"] for p in item_probes)
    assert not any(probes.is_correct(p["question"], ["Bourget"]) for p in item_probes if "Durov" in p["question"])
    assert any("Bourget" in " ".join(p["answers"]) for p in item_probes)


def test_locality_counts_lost_knowledge_not_rewording():
    expected = ["Au", "Rome", "Lima", ""]  # the last question has no known answer
    live = [{"answer": a, "correct": c, "expected": e} for a, c, e in
            zip(["It is Au.", "Rome.", "Cusco.", "Hello!"], [True, True, False, False], expected)]
    candidate = [{"answer": a, "correct": c, "expected": e} for a, c, e in
                 zip(["Gold.", "The capital is Rome.", "Cusco.", "Hello!"], [False, True, False, False], expected)]
    scores = probes.locality_scores(live, candidate)
    assert scores["kept"] == 0.5  # of the two the live model knew, gold was lost; Peru never counted
    assert scores["unchanged"] == 0.5  # word for word: only Peru and hello


def test_entities_stay_inside_a_line_and_a_sentence():
    text = "Vesna Kordic named chief executive of Lumora Shipping\nLumora Shipping, the Rotterdam line. It said"
    assert probes.entities(text) == ["Vesna Kordic", "Lumora Shipping", "Rotterdam"]
