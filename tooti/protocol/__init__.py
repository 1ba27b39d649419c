"""Tunnel protocol v1: sans-I/O frames and connection state machine."""
