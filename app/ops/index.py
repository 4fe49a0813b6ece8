"""What a browser (or curl) finds at ``GET /`` and ``GET /docs``.

``/`` lists the served methods (predict URL, inputs and outputs with dtype and shape)
and links to the other endpoints: JSON for clients, HTML for a browser. ``/docs`` is
Swagger UI over ``/openapi.json``. Its JavaScript and CSS come from the maintained
``flask-swagger-ui`` package (Swagger UI's own dist files, updated with each Swagger
UI release) and are served from this process: the page works without network access,
and nothing on it is fetched from a CDN.
"""

from __future__ import annotations

import html
import importlib.resources
from functools import lru_cache
from typing import Any

from .metadata import describe_method
from .openapi import mserve_version

LINKS = {
    "docs": "/docs",
    "openapi": "/openapi.json",
    "models": "/models",
    "health": "/health",
    "ready": "/ready",
    "metrics": "/metrics",
}

# The Swagger UI files /docs needs, and their media types; nothing else is served.
_ASSETS = {
    "swagger-ui.css": "text/css",
    "index.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}


def _spec(spec: dict[str, Any]) -> str:
    if spec.get("dtype") is None:
        return spec["name"]
    shape = spec.get("shape")
    dims = "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{spec['name']} {spec['dtype']}[{dims}]"


def index_json(servables: dict[str, Any]) -> dict[str, Any]:
    """The served methods of each servable's latest version, and the endpoints."""
    methods = []
    for name in sorted(servables):
        servable = servables[name]
        latest = servable.versions[servable.latest]
        for method in latest.methods.values():
            described = describe_method(latest, method)
            methods.append(
                {
                    "servable": name,
                    "version": servable.latest,
                    "versions": sorted(servable.versions),
                    "method": method.name,
                    "url": f"/model/{name}:{method.name}",
                    "inputs": described["inputs"],
                    "outputs": described["outputs"],
                }
            )
    return {"name": "mserve", "version": mserve_version(), "methods": methods, "links": dict(LINKS)}


def index_html(listing: dict[str, Any]) -> str:
    esc = html.escape
    rows = "".join(
        "<tr><td>{servable}</td><td>{version}</td><td><code>POST {url}</code></td><td>{inputs}</td>"
        "<td>{outputs}</td><td><a href=\"/model/{servable}\">metadata</a></td></tr>".format(
            servable=esc(m["servable"]),
            version=esc(", ".join(map(str, m["versions"]))),
            url=esc(m["url"]),
            inputs=esc(", ".join(_spec(s) for s in m["inputs"])),
            outputs=esc(", ".join(_spec(s) for s in m["outputs"])),
        )
        for m in listing["methods"]
    )
    if not rows:
        rows = '<tr><td colspan="6">no servable is loaded (yet: see /ready)</td></tr>'
    links = " &middot; ".join(f'<a href="{esc(url)}">{esc(name)}</a>' for name, url in listing["links"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mserve</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head>
<body><h1>mserve {esc(listing["version"])}</h1>
<p>{links}</p>
<p>Try the methods in <a href="/docs">the interactive API page</a>, or POST
<code>{{"instances": [{{...}}]}}</code> to a method's URL.</p>
<table><tr><th>servable</th><th>versions</th><th>method</th><th>inputs</th><th>outputs</th><th></th></tr>
{rows}</table></body></html>
"""


def docs_html() -> str:
    """Swagger UI over /openapi.json, every asset served by this server."""
    return """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mserve API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="stylesheet" href="/docs/index.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head><body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>
window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    tryItOutEnabled: true
  });
};
</script>
</body></html>
"""


def docs_asset(name: str) -> tuple[bytes, str] | None:
    """(content, media type) of one Swagger UI file, or None when not one of them."""
    mimetype = _ASSETS.get(name)
    if mimetype is None:
        return None
    return _read_asset(name), mimetype


@lru_cache(maxsize=None)
def _read_asset(name: str) -> bytes:
    return (importlib.resources.files("flask_swagger_ui") / "dist" / name).read_bytes()

