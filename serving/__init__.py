"""Ray Serve application: HTTP API, batching, auth, metrics (issue [serve]; not built yet)."""
