"""``tooti tui``: a live terminal view of a gateway, fed by its admin events stream.

Textual is imported only by :mod:`tooti.tui.app` (the app: layout, drawing, keys),
:mod:`tooti.tui.table` (the live table both panes use) and :mod:`tooti.tui.screens`
(the details and help screens). The rest does not, so it can be used and tested
without it: :mod:`tooti.tui.state` (the network model the events build: peers, clocks,
totals), :mod:`tooti.tui.flows` (its requests and their rates), :mod:`tooti.tui.views`
(the peer and request views), :mod:`tooti.tui.columns` (what the tables show),
:mod:`tooti.tui.header` and :mod:`tooti.tui.details` (the header's and the details
screen's text, in Rich) and :mod:`tooti.tui.client` (the reconnecting SSE client).
"""
