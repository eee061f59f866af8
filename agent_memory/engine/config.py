"""The baking engine's settings (`[bake.engine]` in the config): a typed dataclass with no torch in
reach, so the daemon validates them at start and the trainer (the rest of agent_memory/engine/) reads them.
Numbers from experiments live in bench/results; each field keeps one line of why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class EngineConfig:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 3e-3  # high for LoRA, so few steps suffice; the anchors keep it from breaking the rest
    epochs: int = 3
    # A one-fact bake still gets this many optimizer steps. Measured on one headline (2 item probes,
    # the prompted teacher recalls 1/2): 12 steps x 3 samples recalled 0/2 (2 seeds); 30 x 3, 1/2;
    # 30 steps x 6 samples 2/2, 1/2, 1/2, 2/2 over seeds 0-3, in ~60 s.
    min_steps: int = 30
    # Optimizer steps per item of the bake (at least min_steps in all): the work grows with the items.
    # 20 with init "contrast" (15 before: a third less training, and the daemon's 6-headline bake
    # learnt 0.44 of its items with the contrastive init, below the gate: bench/results/knowledge.md).
    steps_per_item: int = 20
    target_kl: float | None = None  # half-baking: stop once the epoch's mean KL/token is below this
    samples_per_query: int = 6
    # Keep only the sampled answers that mention the item (one of its keywords, as the probes check).
    # A 135M teacher, prompted, still drifts off the fact in many samples; training on those teaches
    # noise. Queries where no sample mentions the item keep all their samples.
    on_topic_only: bool = True
    # The first of each query's samples is the teacher's greedy answer: what the prompted model says
    # when asked (and what greedy probes of the student check); the others explore around it.
    greedy_first: bool = True
    temperature: float = 0.7  # 2.0 (paper) makes a 135M model babble; 0.7 keeps the facts in the answers
    max_new_tokens: int = 20  # short answers: the facts come first; 300 tokens (paper) is too slow here
    queries_per_item: int = 8
    # One more query per item makes the teacher recite it (RECITE_TEMPLATE), with this many samples.
    # MLP LoRA, Durov u2 (190 characters), seeds 0-2: 0.45/0.40/0.35 with it, 0.30/0.375/0.20 without.
    recite_samples: int = 2
    # Per item, this many questions about its subject answered with the item's own words, the prompted
    # teacher scoring each token (queries.ITEM_ANSWER_TEMPLATES, up to 8); 0 = off. 6 leaked more than 3
    # for no clear gain in recall (bench/results/knowledge.md).
    item_answers: int = 3
    # On-policy distillation (SDFT, arXiv 2601.19897): per query, this many answers written by the
    # student before training (the live model, unprompted; the first greedy), scored token by token by
    # the prompted teacher, so the KL corrects what the student says itself (an update's stale state).
    student_samples: int = 2
    # Whose queries get them: "updates" (q.strict) or "all" items' (20 facts: recall 0.26 against 0.34,
    # leak 0.10, trainer RSS 4.04 GiB: bench/results/knowledge.md).
    student_scope: str = "updates"
    cloze_queries: int = 2  # of them, fill-in-the-blank questions on the title or fact (cloze_queries())
    # Earlier items taught again in each bake (the daemon passes the live, not superseded ones), with
    # this many queries each: replay against forgetting (bench_sequential.py).
    replay_items: int = 4
    replay_queries: int = 2
    # Unrelated queries with the unprompted live model as teacher (from ANCHOR_QUERIES). 32 against 8,
    # one fact, 2 seeds: KL(base||baked) on the held-out locality questions 0.028 vs 0.052/token,
    # answers unchanged word for word 0.38 vs 0.32; a one-fact bake's steps stay min_steps.
    anchors: int = 32
    # News-like anchors (queries.NEWS_ANCHORS: "latest news about <another subject>", prizes,
    # made-up subjects), teacher unprompted: they keep a bake's names out of other answers. All 28 at
    # N=20 (seed 2): leak 0.12 vs 0.10, recall 0.39 vs 0.34 (bench/results/knowledge.md).
    news_anchors: int = 16
    # Per item, this many more news-like anchors from queries.RELATION_ANCHORS (who won which prize,
    # election, race; who holds which post; what was found, bought, struck: each about a named subject),
    # the unprompted live model their teacher: a bake's names leak most into such answers. N=20, 3
    # seeds: leak 0.051 against 0.104 on the bench's 150 neighbours, recall the same (knowledge.md).
    relation_anchors: int = 2
    # The relation anchors only in bakes of at least this many knowledge items: the leaks are a large
    # bake's, and the daemon's 2-headline bake beside a CPU hog lost its gate twice with them.
    relation_anchors_from: int = 10
    # Per item: its own questions asked about another subject (queries.contrast_queries), teacher unprompted.
    # 12 at N=20: more local (KL 0.048 vs 0.059) but leak 0.10 vs 0.08, recall 0.36 vs 0.44 (knowledge.md).
    contrast_queries: int = 6
    anchor_samples: int = 1
    # Tokens of an anchor's answer (general, news and contrast anchors alike). A leak often comes
    # after a first sentence ("The latest news in Switzerland is a mix of news and speculation. The
    # latest news is that <a baked name>"), past the items' max_new_tokens, where no anchor holds
    # the student to the live model.
    anchor_max_tokens: int = 20
    # Leak checks during training (teacher.leaked_examples): at this many epochs, spread evenly, the
    # student (the delta so far) answers the anchor questions greedily; each answer that names one
    # of the bake's entities the question does not is scored by the live model and trained on from
    # then on (on-policy distillation where the delta leaks); 0 = off. 3 at N=20, 3 seeds: leak 0.044
    # (the defaults 0.093 on other machines; on the same machine and seed 0.083 against 0.100 and
    # 0.083 against 0.050: no gain), recall 0.37 against 0.38; the daemon's 6-headline first bake
    # learnt 0.44 of its items twice (seed 0; 0.50 without: the gate's bar), and a one-fact bake
    # trains ~23 s longer (3 greedy passes over its 54 anchors; bench/results/knowledge.md): off.
    leak_checks: int = 0
    # Per leak check, this many more questions beside the anchors (queries.leak_check_queries: the
    # items' question templates about CONTRAST_SUBJECTS, drawn afresh at each check). 96: a one-fact
    # bake trained 129 s against 79 s with the anchors alone; not measured at N=20.
    leak_questions: int = 0
    # Null-space projection (AlphaEdit, arXiv 2410.02355): each delta module is made blind to the input
    # directions that carry this share of the anchor examples' input energy; 0 = off. The most local
    # bakes measured, but less recall, and more steps or a higher lr on top brought the drift back
    # (bench/results/knowledge.md).
    protect: float = 0.0
    # An anchor token's KL counts this many times an item token's: anchors are few and their KL starts
    # at zero, so at weight 1 the items' pull outweighs them.
    anchor_weight: float = 1.0
    # The anchors' prompt tokens are targets too, each at this weight (0 = off; the live model's
    # next-token distribution over the question: teacher.prompt_targets): locality on every position
    # of an unrelated question, not only on its answer. With rank 16 at N=20: KL 0.069 against 0.074
    # on held-out questions, leak 0.18 against 0.10 (bench/results/knowledge.md): off.
    anchor_prompts: float = 0.0
    # The delta's A before training: "default" (peft's random init) or "eva" (the top singular vectors
    # of each module's inputs on the items' answer tokens: EVA, arXiv 2410.07170). Alone at N=20 EVA
    # recalled 0.41 against 0.34 but drifted more (KL 0.076 against 0.048, leak 0.13). With the anchors'
    # hidden states (hidden_weight 1), 3 seeds: recall 0.37 as here, KL 0.036 against 0.054, but the
    # daemon's 6-headline bake beside a CPU hog was rejected on seeds 0 and 1 (items 0.44 and 0.38,
    # knowledge kept 0.85 and 0.82: bench/results/knowledge.md).
    # "contrast" (the default): the input directions the items' tokens use and the anchors' do not
    # (the top generalized eigenvectors of the two input moments: train.contrast_directions); a bake
    # without anchors keeps the random A. With 20 steps per item against random A and 15 steps
    # (bench/results/knowledge.md): the daemon's 6-headline bake live on seeds 0-2 (items 0.50, 0.56,
    # 0.69 against 0.50, 0.50, rejected at 0.38); N=20, seeds 0-2: recall 0.38 against 0.37,
    # KL 0.049 against 0.054, kept 0.955 against 0.910, but leak 0.09 against 0.08.
    init: str = "contrast"
    # init "contrast": the anchors' moment is regularised by this share of its mean eigenvalue before
    # the items' is whitened by it; small = directions the anchors never use.
    contrast_eps: float = 0.01
    # Deep context distillation (Knowledge Modules, arXiv 2503.08727): beside the KL, the student's
    # hidden states at every answer token are pulled toward the teacher's (L1 distance over the
    # teacher's L1 norm, at hidden_layers evenly spaced layers), at this weight against the KL; 0 = off.
    # On an anchor the teacher is the live model: locality inside the network, not only at its output.
    # On the anchors only, N=20, 3 seeds: KL on held-out questions 0.027 vs 0.054/token, knowledge
    # kept 0.946 vs 0.910, leak 0.07 vs 0.08, but recall 0.32 vs 0.37 (bench/results/knowledge.md): off.
    hidden_weight: float = 0.0
    hidden_layers: int = 6
    # Whose states are matched: the "anchors'" only (an item is taught by the KL alone) or "all"
    # examples'. "all", N=20, 2 seeds: KL 0.042, recall 0.37 against 0.39, but the daemon's
    # 6-headline bake beside a CPU hog learnt 0.31 of its items twice (gate: 0.50); "anchors": 0.56.
    hidden_scope: str = "anchors"
    # Unlearning the superseded state (DPO, arXiv 2305.18290, as a term beside the KL): to an update's
    # questions, asked bare, an answer with the latest state is preferred over a stale one, against the
    # live model's preference (which has the earlier report baked in); this weight against the KL,
    # 0 = off. unlearn_beta: DPO's beta, how far from the live model's margin. On 12 update pairs it
    # moved the margin on the update's own questions (+10 nats) but no held-out answer: latest 0.42
    # and stale 0.25 with it and without, at 1.4x the training time (bench/results/updates.md): off.
    unlearn_weight: float = 0.0
    unlearn_beta: float = 0.1
    # Which pairs (teacher.preference_pairs): "given" (the update's words over the earlier report's),
    # "own" (the teacher's answer naming what is new over the student's own answers that do not), "both".
    unlearn_from: str = "given"
    topk: int = 64  # teacher distribution kept per token (+ one bucket for the rest of the vocab)
    # 16 rows (~600 tokens): steps 0.8 s, FLOP share ~0.42. 32 rows: share 0.49 and 16% more tokens/s,
    # but a step takes 1.7 s, so a one-fact bake's min_steps would cost twice the time.
    batch_size: int = 16
    # Bakes of at least this many optimizer steps train with each layer's MLP and norms compiled
    # (torch.compile: train.compile_blocks; ~6 s with torch's compile cache warm, ~16 s cold); 0 =
    # never. 20 facts, 3 seeds, against eager: training 13% faster (478 s against 547, side by
    # side), trainer peak RSS 3.70-3.90 GiB against 4.02-4.16, kept 0.973 against 0.955, but recall
    # 0.35 against 0.39 and the 3 shared facts 9 of 36 against 16 (the fused kernels kept float32
    # between ops: gradients 5-9% apart). Rounding as eager does (now always), 3 seeds: 14% more
    # tokens/s (seed 0), RSS 3.97 GiB, recall 0.37 against 0.39, shared facts 12 of 36 against 16,
    # leak 0.060 against 0.051 (bench/results/knowledge.md): off, not a gain in what is learnt.
    compile_from_steps: int = 0
    seed: int = 0
    dtype: str = "auto"  # "bfloat16" (autocast; fast only with AMX/AVX-512 bf16), "float32", or "auto": measured
    # "local": sampled in the trainer; "vllm": from the daemon's vLLM (teacher_url). On 2 CPU cores
    # vLLM's LoRA path with top-64 log-probs was 36x slower: 6.1 tok/s for 96 sequences against 220 for
    # transformers in bf16 (bench_teacher.py; vLLM without LoRA: 159, but the teacher has the live adapter).
    teacher: str = "local"
    # Who answers an update's queries (an item that supersedes earlier ones): "base", the model
    # before the live delta (teacher_base_model for teacher "vllm"), or "live". The live model has the
    # superseded state baked in and, prompted with the update, still answers it (bench/results/updates.md).
    update_teacher: str = "base"
    teacher_url: str | None = None  # set by the daemon for teacher "vllm"
    teacher_model: str = "memory"  # the served name of the live model on teacher_url
    teacher_base_model: str = "base"  # the served name of the base model there (update_teacher "base")
    teacher_api_key: str = ""  # the model API key of teacher_url (set by the daemon)
    memory_style: str = "append"  # how u enters the teacher's context (see probes.messages_for)
    # The MLPs only (where knowledge-editing work finds facts stored): one Durov fact, 3 seeds, against
    # all of q/k/v/o/gate/up/down: KL(base||baked) on held-out questions 0.017 vs 0.037/token, answers
    # unchanged 0.53 vs 0.38, recall u1 0.43 vs 0.44, u2 0.40 vs 0.36, training ~15% faster.
    target_modules: list[str] = field(default_factory=lambda: list(MLP_MODULES))
    threads: int = 0  # torch threads; 0 = the cores other processes leave idle (at least 1)

    @classmethod
    def from_dict(cls, d: dict | None) -> "EngineConfig":
        """From `[bake.engine]`: unknown keys and values of the wrong type are refused (ValueError
        naming the key), so config.validate stops the daemon's start, not the first bake."""
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown bake config keys: {sorted(unknown)}")
        defaults = cls()
        for key, value in d.items():
            default = getattr(defaults, key)
            if default is None or value is None:
                continue
            expected = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
                raise ValueError(f"bake config key '{key}' must be {type(default).__name__}, got {value!r}")
        return cls(**d)
