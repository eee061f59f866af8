"""The status page at `/`: live version, queue, bake history, and a plot of probe scores per bake.

The plot is the same PNG that `GET /plot.png` serves and `agent-memory history --plot FILE` saves.
"""

from __future__ import annotations

import html
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .daemon import Daemon


def probe_scores(bakes: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{probe set: [(bake id, accuracy), ...]} from the bakes' recorded gate metrics."""
    series: dict[str, list[tuple[int, float]]] = {}
    for bake in sorted(bakes, key=lambda b: b["id"]):
        for probe_set, score in ((bake.get("metrics") or {}).get("probes") or {}).items():
            series.setdefault(probe_set, []).append((bake["id"], score))
    return series


def plot_png(bakes: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    series = probe_scores(bakes)
    for probe_set, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=probe_set)
    rejected = [b["id"] for b in bakes if b.get("verdict") == "rejected"]
    for bake_id in rejected:
        ax.axvline(bake_id, color="red", alpha=0.25, linewidth=6)
    ax.set_xlabel("bake")
    ax.set_ylabel("probe accuracy (candidate)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Probe scores per bake" + (" (red: rejected)" if rejected else ""))
    if series:
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no bakes yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def status_page(daemon: "Daemon") -> str:
    status = daemon.status()
    bakes = daemon.store.list_bakes(limit=50)
    rows = "\n".join(_bake_row(b) for b in bakes) or '<tr><td colspan="7">no bakes yet</td></tr>'
    queue = ", ".join(f"{k}: {v}" for k, v in status["queue"].items()) or "empty"
    e = html.escape
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>agent-memory</title>
<meta http-equiv="refresh" content="30">
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}}
.passed{{color:#080}}.rejected,.failed{{color:#b00}}</style></head>
<body><h1>agent-memory</h1>
<p>State: <b>{e(status["state"])}</b> &middot; live version <b>{e(status["live_version"])}</b>
&middot; model {e(status["model"])} &middot; vLLM {e(status["vllm"]["urls"] or "off")}
({"healthy" if status["vllm"]["healthy"] else "not healthy"})</p>
<p>Queue: {e(queue)}</p>
<img src="/plot.png" alt="probe scores per bake">
<h2>Bake history</h2>
<table><tr><th>bake</th><th>started</th><th>items</th><th>verdict</th><th>version</th><th>probes</th><th>reason</th></tr>
{rows}</table></body></html>"""


def _bake_row(bake: dict) -> str:
    e = html.escape
    probes = ((bake.get("metrics") or {}).get("probes") or {})
    scores = ", ".join(f"{k} {v:.2f}" for k, v in probes.items())
    verdict = bake.get("verdict") or bake.get("status") or ""
    return (f'<tr><td>{bake["id"]}</td><td>{e(str(bake.get("started_at") or ""))}</td>'
            f'<td>{len(bake.get("item_ids") or [])}</td><td class="{e(verdict)}">{e(verdict)}</td>'
            f'<td>{e(str(bake.get("version") or ""))}</td><td>{e(scores)}</td>'
            f'<td>{e(str(bake.get("reason") or ""))}</td></tr>')
