"""The gateway role: OpenAI-compatible HTTP front door, peer registry and router."""
