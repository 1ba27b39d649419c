"""The gateway role: the OpenAI-compatible front door, the proxy and request validation."""
