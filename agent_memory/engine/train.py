"""3-5. student, loss, train: the live model (live adapter merged, frozen) + one new trainable LoRA
delta on the MLPs (optionally kept off the anchors' input directions: protect), trained on
KL(teacher || student) over all answer tokens, the FIRST one included (optionally beside a
hidden-state distance: hidden_weight), with AdamW, bf16 where the CPU is fast at it (hardware.py),
length-sorted batches, leak checks (leak_checks: the student's own answers that name the bake,
taught back to the live model's) and an early stop at a target KL. Then the cost accounting:
training FLOP/s against a matmul in the same process.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

from .. import adapters
from ..hardware import device
from .config import EngineConfig
from .teacher import Example, Pair, matched_layers, sequence_logps


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


@contextmanager
def without_live(model, live_adapter: Path | None):
    """For the time of the block, `model` (load_live_model's) as the base was: the live delta taken
    out of the weights (in fp32), the live weights put back exactly (saved copies) at the end."""
    if not live_adapter or not (Path(live_adapter) / adapters.CONFIG).exists():
        yield model
        return
    named = dict(model.named_modules())
    saved = {m: named[m].weight.detach().clone() for m in adapters.read_delta(Path(live_adapter))}
    try:
        with torch.no_grad():
            adapters.merge_into(model, Path(live_adapter), weight=-1.0)
        yield model
    finally:
        with torch.no_grad():
            for m, w in saved.items():
                named[m].weight.copy_(w)


def add_lora(model, cfg: EngineConfig, examples: list[Example] = (), pad_id: int = 0):
    """The trainable delta: B = 0, A random (peft's default), or with cfg.init "contrast" the input
    directions the items use and the anchors do not (contrast_directions()), or with "eva" the top
    right singular vectors of each module's inputs on the items' answer tokens (EVA, arXiv
    2410.07170, peft's implementation; one rank for all modules, so the delta saves as one rank and
    alpha)."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    eva = cfg.init == "eva"
    items = [e for e in examples if e.kind != "anchor"]
    if eva and not items:
        raise ValueError("init 'eva' needs item examples to take the inputs' directions from")
    # A bake without anchors (behaviour only) has nothing to contrast: it keeps peft's random A.
    contrast = cfg.init == "contrast" and 0 < len(items) < len(examples)
    directions = contrast_directions(model, examples, cfg) if contrast else {}
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=cfg.target_modules,
                      bias="none", task_type="CAUSAL_LM", init_lora_weights="eva" if eva else True,
                      eva_config=EvaConfig(rho=1.0) if eva else None)
    torch.manual_seed(cfg.seed)  # A's random init
    peft_model = get_peft_model(model, lora)  # peft keeps adapter weights in fp32 on a bf16 base
    if eva:
        initialize_lora_eva_weights(peft_model, _padded_batches(items, pad_id, peft_model.device), show_progress_bar=False)
    if contrast:
        with torch.no_grad():
            for key, module in lora_modules(peft_model):
                a = module.lora_A["default"].weight
                a.copy_(directions[key].to(device=a.device, dtype=a.dtype))
    return peft_model


def _padded_batches(examples: list[Example], pad_id: int, on, batch_size: int = 16, most: int = 32) -> list[dict]:
    """Right-padded prompt + answer rows for EVA's SVD and input_moments; labels -100 outside the
    answers, so for EVA only the answer tokens (the item's content, not the chat template) count.
    At most `most` batches, taken evenly across the examples (they come item by item), so every
    item has its say."""
    examples = examples[::max(1, math.ceil(len(examples) / (batch_size * most)))]
    batches = []
    for start in range(0, len(examples), batch_size):
        group = examples[start:start + batch_size]
        width = max(len(e.prompt_ids) + len(e.answer_ids) for e in group)
        ids = torch.full((len(group), width), pad_id)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for b, e in enumerate(group):
            row = e.prompt_ids + e.answer_ids
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
            labels[b, len(e.prompt_ids):len(row)] = torch.tensor(e.answer_ids)
        batches.append({"input_ids": ids.to(on), "attention_mask": mask.to(on), "labels": labels.to(on)})
    return batches


# ----------------------------------------------------------------------------------------------
# 3b. protect: the delta blind to what the anchors' tokens look like (null-space projection)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def input_moments(model, examples: list[Example], cfg: EngineConfig, most: int = 128,
                  batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{module: sum x x^T}: per target module, the second moment of its inputs over every token of
    `examples` (prompt and answer, no padding; at most `most` of them, taken evenly: they come item
    by item). Modules that read the same input (gate_proj and up_proj) share one tensor object."""
    sums: dict[str, torch.Tensor] = {}
    twins: dict[str, str] = {}  # module -> the module whose input it reads too (up_proj -> gate_proj)
    real = None  # [B, T] bool: the batch's tokens that are not padding
    seen = {}  # id of an input this batch -> (the input, kept so the id stays its own; first reader)

    def hook(name):
        def accumulate(module, args):
            first = seen.setdefault(id(args[0]), (args[0], name))[1]
            if first != name:  # the same tensor as another module's input: one moment for both
                twins[name] = first
                return
            x = args[0][real].float()
            sums[name] = sums.get(name, 0) + x.T @ x
        return accumulate

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] in cfg.target_modules and isinstance(m, torch.nn.Linear)]
    try:
        # Right-padded (a real token never sees the padding, whose id is then irrelevant: 0). The
        # decoder alone: the moments need no logits.
        for batch in _padded_batches(examples, 0, model.device, batch_size, most=math.ceil(most / batch_size)):
            real, seen = batch["attention_mask"].bool(), {}
            model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return sums | {name: sums[first] for name, first in twins.items()}


@torch.no_grad()
def protected_bases(model, examples: list[Example], cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """{module: U [in, k]}: per target module, the input directions that carry cfg.protect of the
    anchor examples' input energy (the top eigenvectors of sum x x^T over their tokens).

    After AlphaEdit (arXiv 2410.02355): a delta whose A is projected off these directions barely
    moves the outputs of inputs like the anchors (general questions, other subjects' news), so the
    items' knowledge has to live in directions their own tokens (their names) use. A bake without
    anchors (behaviour only) gets no bases: nothing to protect.
    """
    def basis(name, moment):
        values, vectors = torch.linalg.eigh(moment)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        k = int((values.cumsum(0) / values.sum() < cfg.protect).sum()) + 1
        return vectors[:, :k].contiguous()

    return per_input(input_moments(model, [e for e in examples if e.kind == "anchor"], cfg, most=len(examples)), basis)


@torch.no_grad()
def contrast_directions(model, examples: list[Example], cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """{module: A [rank, in]}: per target module, the input directions the items' tokens use much
    more than the anchors' do: the top generalized eigenvectors of (C_items, C_anchors + eps I), C
    the second moment of the module's inputs. A delta that reads these starts where the bake's names
    are and unrelated questions are not (cfg.init "contrast"); rows of unit norm, as EVA's."""
    items = input_moments(model, [e for e in examples if e.kind != "anchor"], cfg)
    anchors = input_moments(model, [e for e in examples if e.kind == "anchor"], cfg)
    return per_input(items, lambda name, c_items: top_generalized(c_items, anchors[name], cfg.rank,
                                                                  cfg.contrast_eps, cfg.seed))


def per_input(moments: dict[str, torch.Tensor], solve) -> dict[str, torch.Tensor]:
    """{module: solve(module, its moment)}, solved once per moment tensor: modules that read the
    same input (gate_proj and up_proj) share input_moments()'s tensor, and so the result."""
    solved: dict[int, torch.Tensor] = {}  # id of a moment (alive in `moments`) -> its result
    for name, m in moments.items():
        if id(m) not in solved:
            solved[id(m)] = solve(name, m)
    return {name: solved[id(m)] for name, m in moments.items()}


def top_generalized(c: torch.Tensor, b: torch.Tensor, k: int, eps: float, seed: int = 0,
                    iterations: int = 20) -> torch.Tensor:
    """[k, d]: the top k generalized eigenvectors of (c, b + eps I) (c and b each scaled to trace 1,
    eps a share of b's mean eigenvalue), rows of unit norm. Only k of d are wanted and they stand
    well apart from the rest: block power iteration on L^-1 c L^-T (L L^T = b + eps I) with 2k
    vectors, then Rayleigh-Ritz, needs no d x d product or full eigendecomposition: eigh's vectors
    to a cosine of 0.997 or more in a tenth of its time (bench/results/knowledge.md)."""
    c, b = c.float() / c.trace(), b.float() / b.trace()
    d = b.shape[0]
    chol = torch.linalg.cholesky(b + eps / d * torch.eye(d, dtype=b.dtype, device=b.device))

    def whitened(q):  # L^-1 c L^-T q
        return torch.linalg.solve_triangular(chol, c @ torch.linalg.solve_triangular(chol.T, q, upper=True), upper=False)

    start = torch.randn(d, min(2 * k, d), generator=torch.Generator().manual_seed(seed)).to(b)
    q = torch.linalg.qr(start).Q
    for _ in range(iterations):
        q = torch.linalg.qr(whitened(q)).Q
    small = q.T @ whitened(q)
    _, s = torch.linalg.eigh((small + small.T) / 2)  # ascending
    v = torch.linalg.solve_triangular(chol.T, q @ s[:, -k:].flip(1), upper=True)  # back from the whitened space
    return (v / v.norm(dim=0)).T.contiguous()


class _OffBasis(torch.nn.Module):
    """A -> A (I - U U^T): lora_A's weight with its component along U taken out."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):  # a parametrization must keep A's dtype
            return a - (a @ self.basis) @ self.basis.T


def protect(peft_model, bases: dict[str, torch.Tensor]) -> list:
    """Constrain each lora_A named in `bases` to the complement of its basis; returns the modules,
    for fold() to make the constraint part of the weights when training is over."""
    from torch.nn.utils import parametrize

    modules = []
    for key, module in lora_modules(peft_model):
        if key in bases:
            a = module.lora_A["default"]
            parametrize.register_parametrization(a, "weight", _OffBasis(bases[key].to(a.weight.device)))
            modules.append(a)
    return modules


def fold(modules: list) -> None:
    """protect()'s constraint made permanent: each lora_A's weight becomes A (I - U U^T)."""
    from torch.nn.utils import parametrize

    for a in modules:
        parametrize.remove_parametrizations(a, "weight", leave_parametrized=True)


def lora_modules(peft_model):
    """(module name in adapters.py's naming, its LoRA layer) for each layer of the trainable delta."""
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            yield name.removeprefix("base_model.model."), module


def lora_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of the trainable delta, in adapters.py's module naming."""
    return {key: (module.lora_A["default"].weight.detach().float().cpu().clone(),
                  module.lora_B["default"].weight.detach().float().cpu().clone())
            for key, module in lora_modules(peft_model)}


# ----------------------------------------------------------------------------------------------
# 4. loss
# ----------------------------------------------------------------------------------------------

def topk_kl(student_logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, with the teacher's mass outside its top-k in one bucket.

    This is the exact KL between the two distributions coarsened to (top-k tokens, everything else):
    a lower bound on the full-vocabulary KL that is tight when the teacher's top-k holds its mass.
    student_logits [N, V]; top_idx, top_logp [N, k]. Returns [N].
    """
    return _TopkKL.apply(student_logits, top_idx, top_logp)


class _TopkKL(torch.autograd.Function):
    """topk_kl, its gradient written out, a block of rows at a time: autograd through log_softmax
    would keep three [N, V] float tensors (the logits' float copy, log_softmax's output, gather's
    zero-filled gradient) for a loss that reads k of V entries (bench/results/knowledge.md: the
    steps' time and memory with and without). With q = softmax(logits), p the teacher's top-k
    probabilities and b = p_rest / q_rest (0 where q_rest is clamped):
    dKL/dlogit_j = q_j (sum p - b sum q_top) + the sum, over the top-k entries at j, of (b q_k - p_k)."""

    ROWS = 128  # logits rows per block: a [128, V] float temporary

    @staticmethod
    def forward(ctx, logits, top_idx, top_logp):
        work = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.cat([block.to(work).logsumexp(-1) for block in logits.split(_TopkKL.ROWS)])
        s = logits.gather(-1, top_idx).to(work) - lse[:, None]  # the student's log-probs at the top-k
        top_logp = top_logp.to(work)
        p, q = top_logp.exp(), s.exp()
        p_rest, q_left = (1 - p.sum(-1)).clamp_min(1e-8), 1 - q.sum(-1)
        q_rest = q_left.clamp_min(1e-8)
        ctx.save_for_backward(logits, top_idx, lse, p, q, torch.where(q_left > 1e-8, p_rest / q_rest, 0.0))
        return (p * (top_logp - s)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())

    @staticmethod
    def backward(ctx, grad):
        logits, top_idx, lse, p, q, b = ctx.saved_tensors
        everywhere = grad * (p.sum(-1) - b * q.sum(-1))  # [N]: times q_j at every token j
        at_top = grad[:, None] * (b[:, None] * q - p)  # [N, k]: added at the top-k tokens
        out = torch.empty_like(logits)
        for start in range(0, len(logits), _TopkKL.ROWS):
            rows = slice(start, start + _TopkKL.ROWS)
            block = (logits[rows].to(lse.dtype) - lse[rows, None]).exp_().mul_(everywhere[rows, None])
            out[rows] = block.scatter_add_(-1, top_idx[rows], at_top[rows])
        return out, None, None


# ----------------------------------------------------------------------------------------------
# 5. train
# ----------------------------------------------------------------------------------------------

def make_batches(examples: list[Example], batch_size: int, pad_id: int, share_prefix: bool = True,
                 anchor_weight: float = 1.0, prompt_weight: float = 0.0) -> list[dict]:
    """Length-sorted batches (little padding), right-padded; answer positions flattened (with
    `prompt_weight`, also the prompt positions of examples that carry prompt targets).

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
        top_idx, top_logp, states = [], [], []  # states: (the teacher's hidden states or None, targets)
        for b, (e, s) in enumerate(zip(group, seqs)):
            ids[b, :len(s) - shared] = torch.tensor(s[shared:])
            mask[b, :len(s) - shared] = 1
            # The logits at position len(prompt)-1 predict answer token 0: the FIRST answer token
            # is a target (the paper's reference code starts one later and loses it).
            first = len(e.prompt_ids) - 1 - shared
            if prompt_weight and e.prompt_top_idx is not None:  # and each prompt token after the shared prefix
                rows += [b] * first
                cols += list(range(first))
                weights += [prompt_weight] * first
                top_idx.append(e.prompt_top_idx[shared:])
                top_logp.append(e.prompt_top_logp[shared:])
                states.append((None, first))
            rows += [b] * len(e.answer_ids)
            cols += list(range(first, first + len(e.answer_ids)))
            weights += [anchor_weight if e.kind == "anchor" else 1.0] * len(e.answer_ids)
            top_idx.append(e.top_idx)
            top_logp.append(e.top_logp)
            states.append((e.hidden, len(e.answer_ids)))
        batches.append({
            "prefix": torch.tensor([group[0].prompt_ids[:shared]], dtype=torch.long),
            "input_ids": ids, "attention_mask": mask, "rows": torch.tensor(rows), "cols": torch.tensor(cols),
            "top_idx": torch.cat(top_idx), "top_logp": torch.cat(top_logp),
            "weights": torch.tensor(weights),
            "tokens": int(mask.sum()) + shared, "targets": len(rows), **_hidden_targets(states),
        })
    return batches


def _hidden_targets(states: list[tuple[torch.Tensor | None, int]]) -> dict:
    """{"hidden": [targets, layers, d], "hidden_mask": [targets]} for a batch's targets, zeros and
    False where the teacher gave no hidden states; {} when it gave none at all."""
    known = [h for h, _ in states if h is not None]
    if not known:
        return {}
    zeros = lambda n: torch.zeros(n, *known[0].shape[1:], dtype=known[0].dtype)  # noqa: E731
    return {"hidden": torch.cat([zeros(n) if h is None else h for h, n in states]),
            "hidden_mask": torch.cat([torch.full((n,), h is not None) for h, n in states])}


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def batch_losses(peft_model, batch: dict, autocast: bool, layers: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL per target [N], and with `layers` (and hidden targets in the batch) the distance of the
    student's hidden states at those layers from the teacher's per target [N] (L1 over the teacher's
    L1 norm, averaged over the layers), else None. The LM head runs only at the target positions (it
    is 1/5 of the FLOPs)."""
    inner = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers injected
    on = inner.device
    batch = {k: v.to(on) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shared = batch["prefix"].shape[1]
    layers = layers if "hidden" in batch else ()
    with torch.autocast(on.type, dtype=torch.bfloat16, enabled=autocast):
        if shared:  # the shared prefix once; gradients flow through its cache into the LoRA too
            cache = inner.model(input_ids=batch["prefix"], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(ids))
            full_mask = torch.cat([torch.ones(len(ids), shared, dtype=mask.dtype, device=on), mask], 1)
            positions = (shared + torch.arange(ids.shape[1], device=on)).expand(len(ids), -1)
            out = inner.model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                              past_key_values=cache, use_cache=True, output_hidden_states=bool(layers))
        else:
            out = inner.model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers))
        rows, cols = batch["rows"], batch["cols"]
        logits = inner.lm_head(out.last_hidden_state[rows, cols])
    kl = topk_kl(logits, batch["top_idx"], batch["top_logp"])
    if not layers:
        return kl, None
    mine = torch.stack([out.hidden_states[i][rows, cols] for i in layers], 1).float()  # [N, layers, d]
    theirs = batch["hidden"].float()
    return kl, ((mine - theirs).abs().sum(-1) / theirs.abs().sum(-1).clamp_min(1e-6)).mean(-1)


def preference_loss(peft_model, pairs: list[Pair], beta: float, autocast: bool) -> torch.Tensor:
    """DPO (arXiv 2305.18290) over `pairs`: -log sigmoid(beta * (the student's margin of chosen over
    rejected - the live model's)). Where chosen and rejected share words, their log-probs cancel in
    the margin: what moves is the state the update changed."""
    losses = []
    with torch.autocast(peft_model.device.type, dtype=torch.bfloat16, enabled=autocast):
        for pair in pairs:
            logp = sequence_logps(peft_model, pair.prompt_ids, [pair.chosen_ids, pair.rejected_ids])
            losses.append(-torch.nn.functional.logsigmoid(beta * (logp[0] - logp[1] - pair.ref_margin)))
    return torch.stack(losses).mean()


def leak_check_epochs(epochs: int, checks: int) -> set[int]:
    """The epochs that start with a leak check (cfg.leak_checks of them, spread evenly; never the
    first: the delta is still zero there)."""
    return {max(1, round(epochs * j / (checks + 1))) for j in range(1, checks + 1)} if epochs > 1 else set()


def train(peft_model, batches: list[dict], cfg: EngineConfig, progress=None, items: int = 1,
          pairs: list[Pair] = (), leak_check=None) -> dict:
    """`leak_check()`: batches of the student's answers that leak the bake's names, scored by the
    live model (teacher.leaked_examples); at the epochs of leak_check_epochs() they join the
    epoch's batches, and stay for the rest of training."""
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
    layers = matched_layers(peft_model.config.num_hidden_layers, cfg)
    # Each batch carries every len(batches)-th preference pair (unlearn_weight): each pair once an epoch.
    paired = [pairs[i::len(batches)] for i in range(len(batches))]
    checks = leak_check_epochs(epochs, cfg.leak_checks) if leak_check else set()
    # A large bake's steps with its MLPs and norms compiled; a small one's would not earn the compile back.
    compiled, compile_error, t = [], None, time.monotonic()
    if 0 < cfg.compile_from_steps <= total_steps:
        compiled, compile_error = compile_blocks(peft_model, batches[0], autocast, layers)
    compiling = time.monotonic() - t
    pool, leaks, checking = list(batches), [], 0.0  # leaks: per check, the leaking answers found
    runs = [0] * len(batches)  # steps each batch of the pool was trained on (the FLOP count)
    peft_model.train()
    curve, step, tokens, started = [], 0, 0, time.monotonic()
    for epoch in range(epochs):
        if epoch in checks:  # where the delta trained so far names the bake where it should not
            t = time.monotonic()
            found = leak_check()
            checking += time.monotonic() - t
            pool += found
            runs += [0] * len(found)
            leaks.append(sum(len(b["input_ids"]) for b in found))  # a batch row per leaking answer
        order = list(range(len(pool)))
        rng.shuffle(order)
        kl_sum, kl_n = 0.0, 0
        # peft casts each LoRA input to the adapter's float32, and autocast casts it straight back to
        # bfloat16 for the matmul: the same numbers, after two copies of every MLP input. Skipped for
        # the epoch's steps (not for a leak check's greedy answers, which run without autocast).
        with disable_input_dtype_casting(peft_model, active=autocast):
            for i in order:
                kl, distance = batch_losses(peft_model, pool[i], autocast, layers)
                weights = pool[i]["weights"].to(kl.device)
                loss = (kl * weights).sum() / weights.sum()
                if distance is not None:  # deep context distillation: the teacher's states, where known
                    w = weights * pool[i]["hidden_mask"].to(kl.device)
                    loss = loss + cfg.hidden_weight * (distance * w).sum() / w.sum()
                if i < len(paired) and paired[i]:  # unlearning: the update's words over the earlier report's
                    loss = loss + cfg.unlearn_weight * preference_loss(peft_model, paired[i], cfg.unlearn_beta, autocast)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                tokens += pool[i]["tokens"]
                runs[i] += 1
                kl_sum, kl_n = kl_sum + float(kl.detach().sum()), kl_n + kl.numel()
                curve.append({"step": step, "epoch": epoch, "kl": round(float(loss.detach()), 6)})
                if progress:
                    progress("train", min(step, total_steps), total_steps)  # leak batches run past the plan
        epoch_kl = kl_sum / max(kl_n, 1)
        curve[-1]["epoch_kl"] = round(epoch_kl, 5)
        if cfg.target_kl is not None and epoch_kl <= cfg.target_kl:
            break  # half-baked on purpose: close enough to the teacher
    peft_model.eval()
    uncompile(compiled)  # the probes after training generate: eager, no compile for their shapes
    seconds = time.monotonic() - started
    return {"steps": step, "epochs_run": epoch + 1, "train_seconds": round(seconds, 2),
            "compiled": bool(compiled), "compile_seconds": round(compiling, 2), "compile_error": compile_error,
            "train_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "curve": curve, "final_epoch_kl": round(epoch_kl, 5), "leaks_found": leaks,
            "leak_check_seconds": round(checking, 2),
            "train_flops": train_flops(peft_model.config, pool, dict(enumerate(runs)))}



COMPILED = ("mlp", "input_layernorm", "post_attention_layernorm")


def compile_blocks(peft_model, batch: dict, autocast: bool, layers: list[int]) -> tuple[list, str | None]:
    """Each decoder layer's MLP (its LoRA in it) and norms under torch.compile, their elementwise work
    fused, then one trial step on `batch` (no optimizer step) to compile the forward and backward up
    front: (the compiled modules, None), or where compiling fails (no C++ compiler, say) the modules
    eager again and ([], the error). The attention stays eager: its cache's per-layer state made
    each layer compile anew (bench/results/knowledge.md: steps and compile time, with and without)."""
    import torch._inductor.config as inductor

    # Round to bfloat16 after each op as eager does; fused kernels otherwise keep float32 in
    # between, and those gradients were 5-9% off eager's (bench/results/knowledge.md).
    inductor.emulate_precision_casts = True
    inner = peft_model.base_model.model.model
    modules = [getattr(layer, name) for layer in inner.layers for name in COMPILED]
    for m in modules:
        m.compile(dynamic=True)
    try:
        with disable_input_dtype_casting(peft_model, active=autocast):
            kl, _ = batch_losses(peft_model, batch, autocast, layers)
            kl.sum().backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: train eager, say why in bake.json
        uncompile(modules)
        return [], f"{type(e).__name__}: {e}"[:500]
    finally:
        peft_model.zero_grad(set_to_none=True)
    return modules, None


def uncompile(modules: list) -> None:
    for m in modules:
        m._compiled_call_impl = None  # what nn.Module.compile() set: calls go to the eager forward again


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
