"""Routing policies: how a gateway orders candidate nodes for a request."""
