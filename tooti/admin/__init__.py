"""The admin HTTP API every accepting role serves, and the clients that read it."""
