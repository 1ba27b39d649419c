"""``tooti tui``: a live terminal view of a gateway, fed by its admin events stream.

Only :mod:`tooti.tui.app` imports Textual; :mod:`tooti.tui.state` (the network
model the events build), :mod:`tooti.tui.columns` (what the tables show) and
:mod:`tooti.tui.client` (the reconnecting SSE client) do not, so they can be used
and tested without it.
"""
