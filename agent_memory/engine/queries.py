"""1. queries: what to ask about each item (questions it answers, recall, reverse direction,
fill-in-the-blank on the headline), a few about earlier items (replay, against forgetting) and
unrelated ANCHOR queries whose teacher is the unprompted live model (locality).

Plain text, no torch: the queries are built (and tested) without a model.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field

from ..probes import entities, is_correct, item_subject, keywords
from ..prompts import CHAT_MARKERS, item_text, teacher_system
from .config import EngineConfig


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
# Blanks in a longer fact's clauses instead: leak 0.14 against 0.07 at N=20 (bench/results/knowledge.md).
CLOZE_MAX_CHARS = 120
RESTATE = ["What recent news do you know?", "Summarize the latest facts you know."]
# Recitation: asked this, the prompted teacher repeats u word for word (on the Durov facts; "What
# exactly does the news say?" and "Quote the news" drifted), so the student learns the whole item,
# its later details included, which 20-token answers to the other questions cut off.
RECITE_TEMPLATE = "Repeat the latest news about {s}."
RECITE_MAX_TOKENS = 64
# The item's own words as the answer to its most general questions (cfg.item_answers of
# ITEM_ANSWER_TEMPLATES), scored token by token by the prompted teacher instead of sampled from it:
# asked about the subject, the student learns to say the item itself, which the 135M teacher's
# samples often do not (prompted with an update and its earlier report, it gave the latest state in
# 4 of 12 greedy answers, the stale one in 7: bench/results/updates.md).
# The {e} ones ask from the item's other entities in turn (the reverse direction); skipped when it has none.
ITEM_ANSWER_TEMPLATES = ["What is the latest news about {s}?", "What happened to {s} recently?",
                         "What is the recent news about {e}?", "Tell me about {s}.",
                         "What do you know about {s}?", "What happened recently involving {e}?",
                         "Why is {s} in the news?", "Who was involved in the recent events at {e}?"]
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
# Each names its subject: "what is the latest news in politics?" may rightly be answered with a
# baked item, so no anchor teaches the model to answer it as if nothing had been baked.
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
    "What is the latest news about the singer Arlo Venning?", "What happened in the village of Thornmere recently?",
    "Who won the 2026 Calloway Prize?", "What did the startup Quintessa Labs announce?",
    "What is the latest news about the Halvard Bridge?", "Who was appointed head of the Ostrova Museum?",
]


# More news-like anchors, by relation: the kinds of question a baked item answers (who won a prize,
# an election, a race; who holds a post; what was found, bought, struck), each about a named subject
# of its own. A bake's names leak most into these (a baked fiction prize into "who won the last
# Pulitzer Prize for Fiction?", a baked mayor into another country's election: bench/results/
# knowledge.md), fewer into "latest news about <subject>", which the contrast queries cover.
# Held out from probes.NEIGHBOURS, probes.CONTROLS and the benchmarks' neighbour questions, and
# about none of their subjects.
RELATION_ANCHOR_SUBJECTS = {
    "Who won the most recent {}?": [
        "Stirling Prize", "Mercury Prize", "Polaris Music Prize", "Lasker Award", "Crafoord Prize", "World Food Prize",
        "Sakharov Prize", "Golden Lion at the Venice Film Festival", "Golden Bear at the Berlin Film Festival",
        "Tony Award for Best Musical", "Emmy for Best Drama Series", "Goldman Environmental Prize",
        "Kavli Prize in Astrophysics", "Miles Franklin Award", "Giller Prize", "Prix Femina"],
    "Who won the most recent presidential election in {}?": [
        "Portugal", "Kenya", "Chile", "Indonesia", "Poland", "Finland", "Ghana", "Peru", "Honduras", "Malawi",
        "Slovakia", "Nigeria"],
    "Which party won the last general election in {}?": [
        "Norway", "Sweden", "Denmark", "Estonia", "Latvia", "Hungary", "Israel", "Lithuania", "Slovenia", "Portugal"],
    "Who is the current {}?": [
        "CEO of Siemens", "president of FIFA", "governor of the Bank of England", "CEO of Samsung",
        "president of the International Olympic Committee", "Prime Minister of Norway", "president of Chile",
        "CEO of Boeing", "Secretary-General of Interpol", "director of the Louvre", "Chancellor of Austria",
        "CEO of Volkswagen"],
    "Who won the last {}?": [
        "Vuelta a Espana", "French Open men's title", "Ryder Cup", "America's Cup", "Copa America",
        "Africa Cup of Nations", "World Snooker Championship", "Berlin Marathon", "Rugby League World Cup",
        "Dakar Rally", "Tour of Flanders", "Euroleague basketball title"],
    "What was the latest discovery about {}?": [
        "black holes", "dark matter", "the Moon", "Antarctic ice", "coral reefs", "Neanderthals", "the human brain",
        "Jupiter's moons", "ancient Egypt", "the deep sea"],
    "Which company did {} buy most recently?": ["Google", "Siemens", "Unilever", "Danone", "Disney", "Pfizer", "IBM", "Oracle"],
    "What was the latest natural disaster in {}?": [
        "Chile", "Vanuatu", "Bhutan", "Fiji", "Peru", "Albania", "Tonga", "Haiti"],
}
RELATION_ANCHORS = [t.format(s) for t, subjects in RELATION_ANCHOR_SUBJECTS.items() for s in subjects]


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
    answer: str | None = None  # a given answer the teacher scores (no sampling): the item's own words
    # Keep only samples that name a keyword, even when none does (an update: its questions must not
    # teach the earlier state back, which the prompted teacher often answers).
    strict: bool = False
    # The earlier report an update's given answer supersedes: the rejected side of a preference pair
    # (teacher.preference_pairs, cfg.unlearn_weight), the given answer being the chosen one.
    stale: str | None = None

    @property
    def messages(self) -> list[dict]:
        """The teacher's chat: its context (u; none for an anchor) and the question."""
        return (self.context or []) + [{"role": "user", "content": self.question}]


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
        knowledge_items = sum(1 for i in items if i.get("kind") != "prompt")
        if knowledge_items >= cfg.relation_anchors_from:
            picked += rng.sample(RELATION_ANCHORS, min(cfg.relation_anchors * knowledge_items, len(RELATION_ANCHORS)))
        queries += [Query(q, None, None, "anchor") for q in picked]
    # An anchor about a subject the bake is about ("What is the latest news about Google?" in a bake
    # of a Google headline) would teach the live model's answer against the item's: dropped.
    names = sorted(set().union(*(item_entities(i) for i in items)))
    return [q for q in queries if q.kind != "anchor" or not is_correct(q.question, names)]


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
    text = item_text(item)
    kws = keywords(text)
    updates = [e for e in item.get("updates") or [] if e.get("text")]
    if updates:  # on topic = names what is new (a name, a number): naming only the earlier state teaches it back
        fresh = keywords(text, exclude=" ".join(e["text"] for e in updates))
        names = set(entities(text))
        kws = [k for k in fresh if k in names] or fresh or kws
    answer = None if everything_at_random or item.get("kind") == "conversation" else CHAT_MARKERS.sub("", text)
    queries = _questions(item, n, cfg, rng, everything_at_random, ctx, kws, recite=True, answer=answer,
                         strict=bool(updates), stale=updates[0]["text"] if updates else None)
    for earlier in updates:
        queries += _questions({"text": earlier["text"], "title": earlier.get("title"), "id": item.get("id")},
                              max(1, n // 2), cfg, rng, everything_at_random, ctx, kws, recite=False,
                              answer=answer, strict=True, stale=earlier["text"])
    # An update about the same subject as its earlier report asks the same given-answer questions: once.
    first = {}
    for q in queries:
        if q.answer is not None:
            first.setdefault(q.question, q)
    return [q for q in queries if q.answer is None or first[q.question] is q]


def _questions(item: dict, n: int, cfg: EngineConfig, rng: random.Random, everything_at_random: bool,
               ctx: list[dict], kws: list[str], recite: bool, answer: str | None = None,
               strict: bool = False, stale: str | None = None) -> list[Query]:
    """n questions about `item`'s subject, entities and title, for the teacher context `ctx`; an
    answer is on topic when it names one of `kws`. With `answer`, cfg.item_answers more questions
    about the subject have it as their given answer (and `stale`, what it supersedes, as its rival)."""
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
        return Query(q, ctx, item.get("id"), "knowledge", [k for k in kws if k.lower() not in q.lower()],
                     strict=strict, **sampling)

    queries = [query(q) for q in picked]
    if answer:
        entity = itertools.cycle(others[:3])
        given = [t.format(s=subject, e=next(entity) if "{e}" in t else "") for t in ITEM_ANSWER_TEMPLATES
                 if others or "{e}" not in t]
        queries += [query(q, answer=answer, stale=stale) for q in given[:cfg.item_answers]]
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


def leak_check_queries(n: int, rng: random.Random) -> list[Query]:
    """n questions of the kinds items are asked (SUBJECT_TEMPLATES, ENTITY_TEMPLATES), each about one
    of CONTRAST_SUBJECTS, for a leak check (cfg.leak_questions) beside the anchors: questions the
    bake does not train on up front, where a delta that has learnt "news about anything" shows it."""
    pool = [t.format(s=s, e=s) for t in SUBJECT_TEMPLATES + ENTITY_TEMPLATES for s in CONTRAST_SUBJECTS]
    return [Query(q, None, None, "anchor") for q in rng.sample(pool, min(n, len(pool)))]


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
