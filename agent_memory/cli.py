"""`agent-memory`: a thin command line over the daemon API, the store and the model server.

Reads may open the database directly; writes go through the daemon (the one writer).
User mistakes print one line on stderr and exit non-zero; `--json` gives machine output.
"""

from __future__ import annotations

import json
import sys

import click

from . import config as config_mod
from .errors import UserError


class Context:
    def __init__(self, config_path: str | None):
        self.config_path = config_path
        self._cfg = None

    @property
    def cfg(self) -> config_mod.Config:
        if self._cfg is None:
            self._cfg = config_mod.load(self.config_path)
        return self._cfg


pass_ctx = click.make_pass_decorator(Context)


def emit(data, as_json: bool, text: str | None = None) -> None:
    """Print `data` as JSON for scripts, or `text` (default: JSON, indented) for people."""
    if as_json:
        click.echo(json.dumps(data, default=str))
    else:
        click.echo(text if text is not None else json.dumps(data, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
@click.option("--config", "config_path", envvar="AGENT_MEMORY_CONFIG", default=None,
              help="Config TOML file (default: built-in defaults + AGENT_MEMORY_* env vars).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """agent-memory: bake new facts into your model's weights."""
    ctx.obj = Context(config_path)


@cli.command()
@pass_ctx
def daemon(ctx: Context) -> None:
    """Run the long-running service: API, scheduler, managed vLLM."""
    from .daemon import run_daemon

    run_daemon(ctx.cfg)


@cli.group()
def model() -> None:
    """The base model checkpoint."""


@model.command("prepare")
@json_option
@pass_ctx
def model_prepare(ctx: Context, as_json: bool) -> None:
    """Convert the embedded SmolLM2 GGUF to a safetensors checkpoint in the state dir."""
    from .model import prepare_embedded, verify_checkpoint

    cfg = ctx.cfg
    if cfg.model.path:
        answer = verify_checkpoint(cfg.model_dir)
        emit({"model_dir": str(cfg.model_dir), "answer": answer}, as_json,
             f"configured model {cfg.model_dir} loads and answers: {answer!r}")
        return
    log = (lambda msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    path = prepare_embedded(cfg.models_dir, log=log)
    emit({"model_dir": str(path)}, as_json, str(path))


@cli.command()
@click.argument("question")
@click.option("--model", "model_name", type=click.Choice(["memory", "base"]), default="memory")
@click.option("--prompted", is_flag=True,
              help="Also put the baked items in the prompt (what the bake tried to match).")
@click.option("--max-tokens", default=200, show_default=True)
@json_option
@pass_ctx
def ask(ctx: Context, question: str, model_name: str, prompted: bool, max_tokens: int, as_json: bool) -> None:
    """Ask the live model a question."""
    from .client import DaemonClient, chat

    cfg = ctx.cfg
    if not cfg.vllm_urls:
        raise UserError("no model is served (vllm.mode = 'off')")
    messages = [{"role": "user", "content": question}]
    if prompted:
        memory_prompt = DaemonClient(cfg).get("/v1/memory/prompt")["prompt"]
        messages.insert(0, {"role": "system", "content": memory_prompt})
    answer = chat(cfg.vllm_urls[0], model_name, messages, max_tokens=max_tokens, temperature=0)
    emit({"model": model_name, "question": question, "answer": answer}, as_json, answer)


@cli.command()
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Daemon, vLLM, live version, queue depth, last bake."""
    from .client import DaemonClient

    data = DaemonClient(ctx.cfg).get("/v1/status")
    lines = [f"{key:>14}: {value}" for key, value in data.items() if not isinstance(value, (dict, list))]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key:>14}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
    emit(data, as_json, "\n".join(lines))


def main() -> None:
    try:
        cli(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
