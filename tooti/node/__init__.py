"""The node role: serves gateway streams from local backends."""
