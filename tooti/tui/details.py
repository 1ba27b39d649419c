"""What the details screen of ``tooti tui`` says about one request or one peer.

Pure functions of a :class:`~tooti.tui.state.NetworkState` and the gateway time
``now``, returning Rich text (no Textual), so they can be tested without the app.
"""

from __future__ import annotations

from rich.text import Text

from tooti.tui.columns import STATE_STYLES, age, ms, peer_state, rate, request_tok_s, tokens
from tooti.tui.state import NetworkState

STEP_NAMES = {"received": "received", "routed": "routed", "first_token": "first token",
              "finished": "finished", "lost": "lost"}
"""Timeline step kinds as the details screen names them."""


def request_detail(state: NetworkState, request_id: str, now: float) -> Text:
    """A request's fields and its timeline (received → routed → first token →
    finished), with failovers, relative to when it was received."""
    request = state.requests.get(request_id)
    if request is None:
        return Text("This request is no longer tracked.", style="dim")
    out = Text()
    state_word = request.state
    out.append(f"{request.id}\n", style="bold")
    _field(out, "state", state_word, STATE_STYLES.get(state_word, ""))
    _field(out, "model", request.model or "-")
    _field(out, "endpoint", request.endpoint or "-")
    _field(out, "stream", "yes" if request.stream else "no")
    _field(out, "key", request.key_id or "-")
    _field(out, "account", request.account or "-")
    out.append("\n")
    _field(out, "node", request.node or "-")
    _field(out, "tries", str(request.attempts))
    if len(set(request.nodes_tried)) > 1:
        _field(out, "nodes tried", " → ".join(request.nodes_tried))
    out.append("\n")
    _field(out, "TTFT", ms(request.ttft_ms))
    _field(out, "tokens", tokens(request))
    _field(out, "tok/s", rate(request_tok_s(request)))
    _field(out, "latency", ms(request.latency_ms))
    _field(out, "age", age(now - request.received_at))
    out.append("\n")
    if request.error:
        _field(out, "error", request.error, "red")
        out.append("\n")
    out.append("\nTimeline\n", style="bold underline")
    start = request.timeline[0].ts if request.timeline else request.received_at
    previous_node: str | None = None
    for step in request.timeline:
        out.append(f"  +{ms((step.ts - start) * 1000):>8}  ", style="dim")
        name = STEP_NAMES.get(step.kind, step.kind)
        style = STATE_STYLES.get(step.detail, "") if step.kind == "finished" else ""
        out.append(f"{name:<12}", style=style or "bold")
        if step.node:
            arrow = "→ " if step.kind == "routed" else ""
            out.append(f" {arrow}{step.node}", style="cyan")
        if step.detail:
            out.append(f"  {step.detail}", style=style)
        if step.kind == "routed":
            if previous_node is not None and previous_node != step.node:
                out.append(f"  (failover from {previous_node})", style="yellow")
            previous_node = step.node
        out.append("\n")
    if request.active:
        out.append(f"  +{ms((now - start) * 1000):>8}  … in progress\n", style="dim italic")
    return out


def peer_detail(state: NetworkState, peer_id: str, now: float) -> Text:
    """A peer's identity, health per model, heartbeat figures and recent requests."""
    peer = state.peers.get(peer_id)
    if peer is None:
        return Text("This peer is no longer tracked.", style="dim")
    out = Text()
    out.append(f"{peer.id}\n", style="bold")
    word = peer_state(peer, now)
    _field(out, "state", word, STATE_STYLES.get(peer.state, ""))
    _field(out, "role", peer.role)
    _field(out, "via", peer.via)
    _field(out, "address", peer.address or "-")
    out.append("\n")
    _field(out, "software", peer.software or "-")
    if peer.connected_at is not None:
        _field(out, "connected", age(now - peer.connected_at) + " ago")
    _field(out, "RTT", ms(peer.rtt_ms))
    _field(out, "failures", str(peer.failures))
    out.append("\n")
    if peer.gone and peer.left_reason:
        _field(out, "left", peer.left_reason, "red")
        out.append("\n")
    if peer.labels:
        _field(out, "labels", ", ".join(f"{k}={v}" for k, v in sorted(peer.labels.items())))
        out.append("\n")
    if peer.stats:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(peer.stats.items()))
        _field(out, "heartbeat", shown)
        out.append("\n")
    out.append("\nModels\n", style="bold underline")
    for model, record in sorted(peer.per_model.items()):
        price = record.get("price") or {}
        out.append(f"  {model:<24}", style="bold")
        out.append(f" {record.get('in_flight', 0)}/{record.get('capacity', '?')}"
                   f"  TTFT {ms(record.get('ttft_ms'))}  {rate(record.get('tokens_per_s'))}"
                   f" tok/s  {record.get('samples', 0)} samples"
                   f"  price {price.get('input', 0)}/{price.get('output', 0)} per 1M")
        if record.get("state") == "cooldown":
            cooldown = record.get("cooldown") or {}
            out.append(f"  cooldown ({cooldown.get('reason', '?')}, "
                       f"{cooldown.get('seconds_left', '?')}s left)", style="dark_orange")
        out.append("\n")
    recent = state.requests_by_node(peer.id)[:8]
    if recent:
        out.append("\nRecent requests\n", style="bold underline")
        for request in recent:
            out.append(f"  {request.id[:20]:<20}  {request.model:<16} ")
            out.append(f"{request.state:<10}", style=STATE_STYLES.get(request.state, ""))
            out.append(f"  {ms(request.ttft_ms):>8}  {tokens(request)}\n")
    return out


def _field(out: Text, name: str, value: str, style: str = "") -> None:
    out.append(f"{name} ", style="dim")
    out.append(value, style=style or "")
    out.append("   ")
