"""`genlab serve`: an OpenAI-compatible HTTP server over runs, a playground page, API keys, an audit trail and human
evaluation. It calls api.py and holds no model logic (DESIGN.md 1)."""
