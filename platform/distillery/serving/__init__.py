"""Ray Serve + vLLM: the OpenAI-compatible application built from finished runs (app, HTTP ingress, engine server)."""
