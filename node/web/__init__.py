"""The console: the REST API under ``/api/v1``, the page that uses it, ``/healthz`` and ``/metrics``.

- ``node.web.console``: :class:`~node.web.console.Console`, what the console reads and changes in a running node
  (the live settings, the store, the audit trail, the node's parts for health);
- ``node.web.api``: the FastAPI application (:func:`~node.web.api.build_app`): authentication, the API, problem+json
  errors;
- ``node.web.page``: the page (one HTML document; its script calls the API);
- ``node.web.server``: uvicorn in a thread of the node's process (:func:`~node.web.server.start_web`).
"""
