"""The operator's read-only web console: pages, Prometheus metrics, token access.

- `auth`: console tokens, hashed in the home, checked on every request;
- `views`: what each page shows, read from the store as `free-server status` reads it;
- `pages`: the GET routes and their jinja2 templates (``templates/``);
- `metrics`: ``/metrics`` for Prometheus, computed from the store at each scrape;
- `app`: the ASGI app and `ConsoleServer`, the component `free-server start
  --console-port` runs (TLS with the home's certificate, the store opened read-only).
"""
