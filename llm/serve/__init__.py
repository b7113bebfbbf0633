"""The OpenAI-compatible HTTP server: `python -m llm.serve --model ...` (see __main__)."""

from llm.serve.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
