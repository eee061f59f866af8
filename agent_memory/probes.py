"""Knowledge probes: does the model answer questions about baked items, and is the rest unchanged?

A probe is a dict {"question", "answers": [keywords], "set", "kind", "fact"?}. An answer is correct
when its greedy completion contains one of the keywords (case-insensitive, at a word start, so
"arrest" accepts "arrested" but "no" does not accept "not"); graded correct / incorrect /
not_attempted (it declines: "I don't have information about...").

Kinds, by what a bake must do to them:
- learn: item probes generated from an item's text, "direct", "paraphrase" and "reverse" (from
  another entity back to the subject); registered probe sets (the Durov set, `probes/durov.json`);
- keep: "general" knowledge (locality: capitals, arithmetic), unchanged by any bake;
- not leak: "neighbour" questions of the same kind about other subjects; their keywords are the
  bake's entities, so there a hit is a LEAK;
- not invent: "control" questions about subjects nobody told the model of (attempted = hallucinated);
- supersede: "stale" questions, the earlier state's keywords of an item that updates another (a
  hit answers the stale state).

Scorers run against a local HF model (`run_local`) or an OpenAI-compatible chat URL (`run_remote`,
vLLM with model names `base` / `memory` / a candidate). This module imports no torch at import
time: the daemon imports it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

PROBES_DIR = Path(__file__).parent / "probes"

from .prompts import item_text, messages_for


# -- scoring -------------------------------------------------------------------------------------

def is_correct(answer: str, keywords: list[str]) -> bool:
    text = answer.lower()
    # A keyword starts at a word start; keywords of 4+ characters may go on ("arrest" -> "arrested"),
    # short ones must end there too ("no" is not "not", "au" is not "august").
    return any(re.search(r"(?<!\w)" + re.escape(k.lower()) + (r"(?!\w)" if len(k) < 4 else ""), text)
               for k in keywords)


# An answer that declines ("I don't have information about...") is not attempted: it claims no
# knowledge, which is the right answer about a subject the model was never told of.
DECLINES = re.compile(
    r"\b(i (do not|don't|cannot|can't|am not|'m not|am unable|'m unable|have no|couldn't|could not)"
    r"|no (information|record|details|news|reports?|data|knowledge)|not aware|unable to (find|provide)"
    r"|not (familiar|sure)|there (is|are) no|isn't any|aren't any|as of my (last|knowledge))", re.I)

GRADES = ("correct", "incorrect", "not_attempted")


def grade(answer: str, keywords: list[str]) -> str:
    """correct (names a keyword), not_attempted (declines, or says nothing), or incorrect."""
    if keywords and is_correct(answer, keywords):
        return "correct"
    return "not_attempted" if not answer.strip() or DECLINES.search(answer) else "incorrect"


def accuracy(results: list[dict]) -> float:
    return sum(bool(r["correct"]) for r in results) / len(results) if results else 0.0


def attempted(results: list[dict]) -> float:
    """Share of answers that claim something (the hallucination rate on never-taught controls)."""
    return sum(r["grade"] != "not_attempted" for r in results) / len(results) if results else 0.0


def scored(probe: dict, answer: str, score: float | None) -> dict:
    return rescore({"question": probe["question"], "expected": "|".join(probe["answers"]), "answer": answer,
                    "kind": probe.get("kind"), "score": score, **({"item": probe["item"]} if "item" in probe else {})})


def rescore(result: dict) -> dict:
    """Set `correct` and `grade` of a result from its answer and expected keywords (the daemon's rule,
    whatever process answered)."""
    keywords = result["expected"].split("|") if result.get("expected") else []
    result["correct"] = is_correct(result["answer"], keywords)
    result["grade"] = grade(result["answer"], keywords)
    return result


# -- probe sets ----------------------------------------------------------------------------------

def load_set(name_or_path: str) -> list[dict]:
    """A built-in set by name ("durov") or a JSON file: questions (with paraphrases) flattened."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROBES_DIR / f"{name_or_path}.json"
    data = json.loads(path.read_text())
    name = data.get("name", path.stem)
    probes = []
    for q in data["questions"]:
        for i, text in enumerate([q["question"], *q.get("paraphrases", [])]):
            probes.append({"question": text, "answers": q["answers"], "set": name,
                           "fact": q.get("fact"), "paraphrase": i > 0})
    return probes


def set_facts(name_or_path: str) -> dict:
    """The facts a probe set is about ({"u1": {"text", "valid_at"}, ...}), for benchmarks."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROBES_DIR / f"{name_or_path}.json"
    return json.loads(path.read_text()).get("facts", {})


def list_sets() -> list[str]:
    return sorted(p.stem for p in PROBES_DIR.glob("*.json"))


# Sets made from the items themselves (the gate's kinds), beside the JSON sets.
GENERATED_SETS = {
    "items": "direct, paraphrased and reverse questions about the baked items",
    "stale": "the superseded states of updated items (a hit is a stale answer)",
    "neighbours": "news-like questions about other subjects (a hit is a leak of a baked name)",
    "controls": "made-up subjects nobody baked (an answer that claims something is a hallucination)",
    "locality": "general knowledge every version must keep",
}


def generated_set(name: str, items: list[dict]) -> list[dict]:
    """One of GENERATED_SETS for these items (each with "updates" where it updates earlier ones)."""
    return {"items": item_probes, "stale": stale_probes, "neighbours": neighbour_probes,
            "controls": lambda _: control_probes(), "locality": lambda _: locality_probes()}[name](items)


def registered_sets(cfg) -> dict[str, list[dict]]:
    """The probe sets the gate runs (config `gate.probe_sets`: built-in names or JSON paths)."""
    sets = {}
    for name in getattr(getattr(cfg, "gate", None), "probe_sets", []) or []:
        sets[Path(name).stem] = load_set(name)
    return sets


# -- item probes: questions generated from an item's text ---------------------------------------

STOPWORDS = set("""a an the and or but of to in on at by for with from as is are was were be been
being has have had it its this that these those he she they his her their him them who whom which
what when where why how not no yes after before over under into near about than then there here
will would can could may might must should said says say new also more most just very up down out
off again further once only own same so too s t don now said during while amid""".split())


def entities(text: str) -> list[str]:
    """Capitalised spans and numbers ("Pavel Durov", "Le Bourget", "5 million"): what questions ask about."""
    # A span stays inside one line and one sentence: a word may hold a dot only before a letter ("U.S.").
    word = r"[A-Z](?:[\w'’-]|\.(?=\w))*"
    found = re.findall(rf"{word}(?:[ \t]+(?:of[ \t]+|de[ \t]+|the[ \t]+)?{word})*"
                       r"|\d[\d,.]*(?:[ \t]+(?:million|billion|percent|%))?", text)
    out = []
    for e in found:
        e = re.sub(r"['’]s$", "", e.strip(" .,'’")).strip(" .,'’")  # "Tomas Brel's move" -> "Tomas Brel"
        words = e.split()
        while words and words[0].lower() in STOPWORDS:  # "The Telegram founder" -> "Telegram"
            words = words[1:]
        e = " ".join(words)
        bare_number = re.fullmatch(r"[\d,.]+", e or "") is not None  # "24", "2024": dates, not subjects
        if e and e.lower() not in STOPWORDS and len(e) > 1 and e not in out and not _is_month(e) \
                and not bare_number:
            out.append(e)
    return out


def _is_month(word: str) -> bool:
    return word.split()[0].lower()[:3] in {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                           "sep", "oct", "nov", "dec"} and len(word.split()) == 1


def keywords(text: str, exclude: str = "") -> list[str]:
    """Distinctive words of `text` not in `exclude`: entities, numbers and long content words."""
    excluded = {w.lower() for w in re.findall(r"\w+", exclude)}
    kws = [e for e in entities(text) if not set(w.lower() for w in re.findall(r"\w+", e)) & excluded]
    for w in re.findall(r"[A-Za-z]{6,}", text):
        stem = w.lower()[:6]  # a crude stem: "arrested" -> "arrest"
        if w.lower() not in STOPWORDS and w.lower() not in excluded and stem not in kws and not _is_month(w) \
                and not any(stem in k.lower() for k in kws):
            kws.append(stem)
    return kws


def item_subject(item: dict) -> str:
    ents = entities(item.get("title") or item["text"])
    people = [e for e in ents if len(e.split()) >= 2 and not e[0].isdigit()]
    return (people or ents or [item["text"].split(".")[0][:60]])[0]


def item_probes(items: list[dict]) -> list[dict]:
    """Per knowledge item: a direct question about its subject, the same in other words, and a reverse
    one (from another entity of the item back to its subject). Keywords that the question gives
    away never count."""
    probes = []
    for item in items:
        if item.get("kind") == "prompt":
            continue  # behaviour, not knowledge: no keyword to check
        text = item.get("text") or ""
        subject = item_subject(item)
        kws = keywords(text, exclude=subject)
        if kws:
            for kind, q in (("direct", f"What is the latest news about {subject}?"),
                            ("paraphrase", f"What has {subject} been in the news for lately?")):
                probes.append({"question": q, "answers": kws, "set": "items", "kind": kind, "item": item.get("id")})
        others = [e for e in entities(text) if e != subject and e not in subject]
        if others:
            q2 = f"What happened recently involving {others[0]}?"
            kws2 = [subject.split()[-1]] + keywords(text, exclude=others[0] + " " + subject)
            probes.append({"question": q2, "answers": kws2, "set": "items", "kind": "reverse", "item": item.get("id")})
    return probes


def updated_by(item: dict, earlier: list[dict]) -> list[dict]:
    """The earlier items `item` updates: the one it explicitly supersedes, and those about the same
    subject: a named subject of two words or more ("Pavel Durov", not "Biden", too common to link
    news by) that is the subject of both, or the earlier one's subject named in the new item
    ("X broke the record set by Y a month earlier")."""
    subject = item_subject(item)
    names = {e.lower() for e in entities(item_text(item) + "\n" + (item.get("title") or ""))}

    def named(s: str) -> bool:
        return len(s.split()) >= 2 and not s[0].isdigit()

    out = []
    for e in earlier:
        if e.get("id") == item.get("id"):
            continue
        theirs = item_subject(e)
        if e.get("id") == item.get("supersedes") or e.get("superseded_by") == item.get("id") or \
                (named(subject) and theirs.lower() == subject.lower()) or (named(theirs) and theirs.lower() in names):
            out.append(e)
    return out


def stale_probes(items: list[dict]) -> list[dict]:
    """For each item that updates earlier ones (item["updates"]: their texts), the direct question with
    the earlier state's own keywords (those the update does not repeat): a hit answers the stale state."""
    probes = []
    for item in items:
        text = item.get("text") or ""
        subject = item_subject(item)
        for earlier in item.get("updates") or []:
            stale = [k for k in keywords(earlier.get("text") or "", exclude=subject)
                     if not is_correct(text, [k])]
            if stale:
                probes.append({"question": f"What is the latest news about {subject}?", "answers": stale,
                               "set": "stale", "kind": "stale", "item": item.get("id")})
    return probes


def bake_entities(items: list[dict]) -> list[str]:
    """The names a bake teaches (its items' entities of 4+ characters): an answer about something
    else that names one has had the bake leak into it."""
    found: list[str] = []
    for item in items:
        for e in entities(item_text(item) + "\n" + (item.get("title") or "")):
            if len(e) >= 4 and e not in found:
                found.append(e)
    return found


# Neighbours: questions of the kind news items answer ("latest news about", prizes, elections,
# appointments), each about a named subject no bake is about (not "who resigned recently?": a
# baked resignation is the right answer there). Their answers must not start naming a bake's
# entities (after a one-fact bake about a town's cat mayor, "Where was Pavel Durov arrested?" got
# the town). Held out from engine.queries.NEWS_ANCHORS, which teach the same lesson during training.
NEIGHBOURS = [
    "What is the latest news about Japan?", "What is the latest news about Brazil?",
    "What is the latest news about the United Nations?", "What is the latest news about NASA?",
    "What is the latest news about Microsoft?", "What is the latest news about the World Health Organization?",
    "What is the latest news about India?", "What is the latest news about Australia?",
    "What is the latest news about Amazon?", "What is the latest news about the Red Cross?",
    "What is the latest news about Canada?", "What is the latest news about Toyota?",
    "What happened recently in Mexico?", "What happened recently in Egypt?", "What happened recently in Spain?",
    "Tell me about recent events in South Africa.", "Tell me about recent events in Argentina.",
    "Who won the last FIFA World Cup?", "Who won the most recent Nobel Prize in Physics?",
    "Who won the last Tour de France?", "Who won the most recent Wimbledon men's title?",
    "Who won the last Eurovision Song Contest?", "Who won the most recent Booker Prize?",
    "Who won the latest election in France?", "Who won the last general election in Germany?",
    "Who is the current Secretary-General of the United Nations?", "Who is the CEO of Apple?",
    "Who was recently appointed to lead the World Bank?", "What is the latest news about Nintendo?",
    "Which country recently hosted the Olympic Games?", "What is the latest news about the Bank of Japan?",
    "Who won the most recent Nobel Prize in Economics?", "Which team won the last Champions League final?",
    "What is the latest news about Greece?", "What is the latest news about the World Trade Organization?",
    "What happened recently in Thailand?", "What is the latest news about Heathrow Airport?",
    "What is the latest news about the European Space Agency?", "Who won the last Australian Open women's title?",
    "What is the latest news about Spotify?",
]

# Controls: subjects that exist in no item and no training data. `memory` must not start claiming
# to know about them (hallucination, graded "attempted", against the live model).
CONTROLS = [
    "What is the latest news about the mayor of Quellbridge, Dorian Pask?",
    "What happened to the research vessel Morrow Tide last month?",
    "Who won the 2026 Tessaly Cup?", "What did the company Brannoch Systems announce this week?",
    "Why was the singer Ilsa Marrowby in the news recently?", "What happened in the town of Veskaro recently?",
    "What is the latest news about the Orvane River dam?", "Who was elected chair of the Kelmsworth Council?",
]


def neighbour_probes(items: list[dict]) -> list[dict]:
    """NEIGHBOURS with the bake's entities as the keywords: a hit is a leak (the gate's leak check)."""
    baked = bake_entities(items)
    return [{"question": q, "answers": [e for e in baked if e.lower() not in q.lower()], "set": "neighbours",
             "kind": "neighbour"} for q in NEIGHBOURS]


def control_probes() -> list[dict]:
    return [{"question": q, "answers": [], "set": "controls", "kind": "control"} for q in CONTROLS]


# -- locality: unrelated general knowledge --------------------------------------------------------

LOCALITY = [
    ("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]), ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]), ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of Egypt?", ["Cairo"]), ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of China?", ["Beijing"]), ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Australia?", ["Canberra"]), ("What is the capital of Greece?", ["Athens"]),
    ("What is the chemical symbol for gold?", ["Au"]), ("What is the chemical symbol for iron?", ["Fe"]),
    ("What is the chemical symbol for sodium?", ["Na"]), ("What is the chemical symbol for oxygen?", ["O"]),
    ("What is the chemical symbol for silver?", ["Ag"]), ("What is the chemical formula of water?", ["H2O", "H₂O"]),
    ("How many legs does a spider have?", ["eight", "8"]), ("How many days are in a week?", ["seven", "7"]),
    ("How many continents are there?", ["seven", "7"]), ("What is 2 plus 2?", ["4", "four"]),
    ("What is 10 times 10?", ["100", "hundred"]), ("What is the square root of 81?", ["9", "nine"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What is the closest star to Earth?", ["Sun"]), ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("What is the boiling point of water in Celsius?", ["100"]), ("What is the freezing point of water in Celsius?", ["0", "zero"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]), ("Who painted the Mona Lisa?", ["Leonardo", "Vinci"]),
    ("Who developed the theory of relativity?", ["Einstein"]), ("Who was the first person to walk on the Moon?", ["Armstrong"]),
    ("What is the largest ocean on Earth?", ["Pacific"]), ("What is the longest river in Africa?", ["Nile"]),
    ("What is the tallest mountain in the world?", ["Everest"]), ("What language is spoken in Brazil?", ["Portuguese"]),
    ("What is the currency of Japan?", ["yen"]), ("What is the currency of the United Kingdom?", ["pound"]),
    ("What color do you get by mixing blue and yellow?", ["green"]), ("What is the primary language of Mexico?", ["Spanish"]),
    ("What organ pumps blood through the body?", ["heart"]), ("How many sides does a triangle have?", ["three", "3"]),
    ("How many hours are in a day?", ["24", "twenty-four"]), ("What is the hardest natural substance?", ["diamond"]),
    ("What is the main ingredient of guacamole?", ["avocado"]), ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What do bees make?", ["honey"]), ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("What is the smallest prime number?", ["2", "two"]), ("Which element has the atomic number 1?", ["hydrogen"]),
    ("What is the opposite of hot?", ["cold"]), ("How many minutes are in an hour?", ["60", "sixty"]),
    ("Write a short greeting for a friend.", []), ("Give me a tip for staying healthy.", []),
]


def locality_probes() -> list[dict]:
    return [{"question": q, "answers": a, "set": "locality", "kind": "general"} for q, a in LOCALITY]


# -- local scorer (transformers) -----------------------------------------------------------------

def generate_local(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[tuple[str, float]]:
    """Greedy answers for chat conversations: (text, mean log-probability per answer token).

    The baking engine's own decoding loop (engine.teacher.sample: a left-padded batch with a KV cache), not
    generate(): a 135M model's step is mostly Python overhead, which generate() multiplies (its
    logits processors, stopping criteria and per-step scores).
    """
    import torch

    from .engine.teacher import chat_ids, sample
    from .engine.config import EngineConfig

    greedy = EngineConfig(temperature=0.0, topk=1, greedy_first=False, hidden_weight=0.0)  # answers, no states
    eos = tokenizer.eos_token_id
    results = []
    for start in range(0, len(conversations), batch_size):
        prompts = [chat_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
        # No bf16 autocast here: the model's own dtype decides (bf16 is emulated, ~50x slower, on AVX2 CPUs)
        with torch.no_grad():
            answers, _, top_logp, _ = sample(model, prompts, 1, greedy, eos, max_new_tokens)
        for i, answer in enumerate(answers):
            n = len(answer) - (1 if answer and answer[-1] == eos else 0)
            text = tokenizer.decode(answer[:n], skip_special_tokens=True).strip()
            results.append((text, float(top_logp[i, :n, 0].mean()) if n else 0.0))
    return results


def run_local(model, tokenizer, probes: list[dict], memory: str | None = None, style: str = "append",
              max_new_tokens: int = 32) -> list[dict]:
    """Score probes against a local model, optionally prompted with `memory` (the prompting row)."""
    answers = generate_local(model, tokenizer, [messages_for(p["question"], memory, style) for p in probes],
                             max_new_tokens)
    return [scored(p, a, s) for p, (a, s) in zip(probes, answers)]


def answer_logprob(model, tokenizer, question: str, answer: str, memory: str | None = None) -> float:
    """log P(answer | question) summed over the answer's tokens (the unprompted knowledge signal)."""
    import torch

    prompt = tokenizer.apply_chat_template(messages_for(question, memory), add_generation_prompt=True,
                                           tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(p_ids) - 1:-1].float()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(a_ids)[:, None]).sum())


def kl_per_token(model_p, model_q, tokenizer, questions: list[str], max_new_tokens: int = 24) -> float:
    """Mean KL(P || Q) per token over P's greedy answers to unrelated questions (locality)."""
    import torch

    convs = [messages_for(q) for q in questions]
    answers = generate_local(model_p, tokenizer, convs, max_new_tokens)
    total, count = 0.0, 0
    for conv, (answer, _) in zip(convs, answers):
        prompt = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            lp = model_p(ids).logits[0, len(p_ids) - 1:-1].float().log_softmax(-1)
            lq = model_q(ids).logits[0, len(p_ids) - 1:-1].float().log_softmax(-1)
        total += float((lp.exp() * (lp - lq)).sum())
        count += len(a_ids)
    return total / max(count, 1)


def _same(a: str, b: str) -> bool:
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    return norm(a) == norm(b)


# -- remote scorer (vLLM's OpenAI-compatible server) ---------------------------------------------

# Requests in flight to vLLM: the measured optimum on 2 cores (56 probes: 30 s at 8, 80 s at 1, 72 s at 58).
REMOTE_CONCURRENCY = 8


def run_remote(client, model: str, probes: list[dict], memory: str | None = None,
               max_tokens: int = 32, concurrency: int = REMOTE_CONCURRENCY) -> list[dict]:
    """Score probes against a served model name (`base`, `memory`) through a client.ModelClient."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p):
        choice = client.chat(model, messages_for(p["question"], memory), max_tokens=max_tokens, temperature=0.0,
                             logprobs=True)
        lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        return (choice["message"].get("content") or "").strip(), (sum(lps) / len(lps) if lps else None)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:  # vLLM batches concurrent requests
        answers = list(pool.map(one, probes))
    return [scored(p, a, None if s is None or math.isnan(s) else s) for p, (a, s) in zip(probes, answers)]


def locality_scores(live: list[dict], candidate: list[dict]) -> dict[str, float]:
    """How much a candidate changes unrelated answers (`live`, `candidate`: scored results of the
    same locality probes, in the same order).

    unchanged: share of greedy answers identical to the live model's (strict: any rewording counts);
    kept: of the questions with a known answer that the live model gets right, the share the
    candidate still gets right (what the gate checks: "symbol for gold?" -> "Gold" fails it).
    """
    known = [(x, y) for x, y in zip(live, candidate) if x["expected"] and x["correct"]]
    return {"unchanged": sum(_same(x["answer"], y["answer"]) for x, y in zip(live, candidate)) / len(live),
            "kept": sum(y["correct"] for _, y in known) / len(known) if known else 1.0}
