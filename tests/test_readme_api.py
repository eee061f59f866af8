"""README's table of the daemon's HTTP API lists exactly the routes the app serves, and marks the
token exactly where the app asks for it (issue 14 #11)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.routing import APIRoute

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `(GET|POST|DELETE|PUT|PATCH)` \| `([^`]+)` \| (yes)? *\|", re.M)


def test_the_readme_documents_every_route_and_where_the_token_is_needed(anon):
    served = {(method, re.sub(r"\{\w+\}", "{id}", route.path))
              for route in anon.app.routes if isinstance(route, APIRoute) for method in route.methods}
    documented = {(method, path): bool(token) for method, path, token in ROW.findall(README.read_text())}
    assert set(documented) == served
    for (method, path), needs_token in documented.items():
        status = anon.request(method, path.replace("{id}", "1")).status_code
        assert (status == 401) is needs_token, (method, path, status)
