"""The web console: a quart-trio app the gateway serves under ``/console`` when
``gateway.console`` is on (see docs/console.md).

Users see their balance, usage, requests and keys, redeem codes and copy a quick start;
operators see their nodes, groups and earnings; admins manage accounts and watch the
network live. Every page is rendered on the server (Jinja templates, a local stylesheet,
a small local script for the live views, charts as inline SVG), and every action calls
the same services the admin API and ``/v1/me`` call: the console holds no state of its
own beyond its sign-in sessions.
"""
