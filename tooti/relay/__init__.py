"""The relay role: one outbound link for many nodes (the mesh plus an upstream dialer)."""
