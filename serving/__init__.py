"""The HTTP API on Ray Serve: the gateway (validation, auth, admission), the model deployment (retrieve → aggregate →
generate, batched), request/response schemas, metrics. Imports :mod:`workers` and :mod:`pipeline` only."""
