"""Typed settings for every role, with their defaults and constraints.

This module is the single schema: every table is a msgspec ``Struct`` that refuses
unknown keys, and every field's annotation says what it accepts (``PositiveInt``,
``NonNegativeFloat``, a pattern with the message users see). :mod:`tooti.config`
decodes TOML into these Structs with ``msgspec.convert`` and turns msgspec's errors
into ``FILE:LINE: KEY: MESSAGE``; ``config.example.toml`` documents every field.
Durations are seconds, sizes are bytes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

ROLES = ("gateway", "node", "relay")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

PositiveInt = Annotated[int, Meta(gt=0)]
"""A count, size or limit: an integer > 0."""
PositiveFloat = Annotated[float, Meta(gt=0)]
"""A duration or rate: a number > 0 (an integer is accepted)."""
NonNegativeInt = Annotated[int, Meta(ge=0)]
"""An integer >= 0, where 0 means off."""
NonNegativeFloat = Annotated[float, Meta(ge=0)]
"""A number >= 0 (a price, a grace period that may be none)."""
Role = Annotated[str, Meta(
    pattern=rf"^({'|'.join(ROLES)})\Z",
    extra={"error": f"unknown role '{{value}}' (expected one of: {', '.join(ROLES)})"})]
"""One of :data:`ROLES`."""
LogLevel = Annotated[str, Meta(
    pattern=rf"^(?i:{'|'.join(LOG_LEVELS)})\Z",
    extra={"error": f"unknown log level '{{value}}' (expected one of: {', '.join(LOG_LEVELS)})"})]
"""One of :data:`LOG_LEVELS`, in any case (the loader lower-cases it)."""
LogFormat = Annotated[str, Meta(
    pattern=rf"^({'|'.join(LOG_FORMATS)})\Z",
    extra={"error": f"unknown log format '{{value}}' (expected one of: "
           f"{', '.join(LOG_FORMATS)})"})]
"""One of :data:`LOG_FORMATS`."""
BackendType = Annotated[str, Meta(min_length=1,
                                  extra={"error": "backend type must not be empty"})]
"""A backend type name; which names exist is known only once plugins are loaded."""


class _Table(msgspec.Struct, forbid_unknown_fields=True):
    """A table of settings: decoding refuses keys it does not declare. A constraint's
    ``Meta.extra["error"]`` is the message users see when a value breaks it
    (``{value}`` is replaced by the value)."""


class TunnelSettings(_Table):
    """Limits and timers of tunnel protocol v1 (both ends)."""

    heartbeat_interval: PositiveFloat = 3.0
    """Seconds between HEARTBEAT frames; a peer silent for 3x this is dead."""
    max_frame_bytes: PositiveInt = 1_048_576
    """Largest binary WebSocket message (one frame) accepted."""
    max_streams: PositiveInt = 256
    """Most concurrent streams per session."""
    initial_window: PositiveInt = 262_144
    """Per-stream flow-control credit, in DATA payload bytes."""
    max_control_bytes: PositiveInt = 65_536
    """Largest JSON control payload (HELLO, MODELS, OPEN metadata, ...)."""
    max_relayed_nodes: PositiveInt = 1024
    """Most nodes one relay's tunnel may advertise here (more are refused)."""
    max_models_per_peer: PositiveInt = 256
    """Most models one node may advertise (MODELS, or its ROUTES entry); more is a
    protocol violation."""
    control_frames_per_interval: PositiveInt = 256
    """Connection frames (HEARTBEAT, MODELS, ROUTES, GOAWAY, ...) a peer may send per
    heartbeat interval before its tunnel is read more slowly; over budget for 3
    intervals in a row is a protocol violation. A relay may send one frame and
    ``max_control_bytes // 2`` bytes more per node it advertises."""
    control_bytes_per_interval: PositiveInt = 4_194_304
    """Bytes of connection frames a peer may send per heartbeat interval (as above)."""
    max_heartbeats_per_interval: PositiveInt = 8
    """HEARTBEAT frames a peer may send per heartbeat interval; more is a protocol
    violation."""


class GroupSettings(_Table):
    """A named group of nodes and the API keys whose requests may use them."""

    join_token: str = ""
    """Token a node (or relay) presents to join this group (this or ``join_tokens`` is
    required); its name is ``default``."""
    join_tokens: dict[str, str] = {}
    """More tokens of this group, by name (several are valid at once, for rotation)."""
    api_keys: list[str] = []
    """Bearer keys whose requests belong to this group: raw keys, or ``sha256:<64 hex>``
    digests of them (so the config need not hold the keys themselves)."""


class AliasTiers(_Table):
    """An alias's node model ids in priority tiers (``[gateway.aliases."NAME"]``)."""

    tiers: Annotated[
        list[Annotated[list[str], Meta(min_length=1, extra={
            "error": "a tier needs at least one model id"})]],
        Meta(min_length=1, extra={"error": "an alias needs at least one tier"})]
    """Tier 1 first: ``[["qwen2.5-72b"], ["llama-3.1-70b", "mixtral"]]``. A request goes
    to a later tier only when no node of the tiers before can take it now."""


AliasTarget = str | list[str] | AliasTiers
"""An alias's value: one model id, a list of ids (one tier: the least-loaded node
among all of them serves), or a table with ``tiers``."""


class CorsSettings(_Table):
    """Cross-origin requests from browsers (``[gateway.cors]``); off while
    ``allow_origins`` is empty."""

    allow_origins: list[str] = []
    """Origins (``https://app.example``, scheme://host[:port]) whose pages may call the
    API; ``"*"`` = any origin."""
    max_age: NonNegativeInt = 600
    """Seconds a browser may cache a preflight's answer (``Access-Control-Max-Age``)."""


class GatewaySettings(_Table):
    """The OpenAI-compatible front door."""

    listen: str = "127.0.0.1:8080"
    """HOST:PORT for HTTP and the tunnel endpoint; port 0 picks a free port."""
    tls_cert: str = ""
    """PEM certificate chain to serve ``https://`` and ``wss://`` with (a relay's listener
    too); empty = plain HTTP and ``ws://``. Needs ``tls_key``."""
    tls_key: str = ""
    """PEM private key (unencrypted) of ``tls_cert``."""
    tls_reload_interval: PositiveFloat = 5.0
    """Seconds between checks of ``tls_cert``/``tls_key`` for a new certificate (new
    connections get it; SIGHUP reloads at once)."""
    join_token: str = ""
    """Token nodes must present; empty = accept tunnels from loopback only. Its name
    (shown per node by the admin API) is ``default``."""
    join_tokens: dict[str, str] = {}
    """More join tokens by name, all valid at once (rotate by adding the new one,
    moving nodes over, then removing the old one)."""
    admin_key: str = ""
    """Key for /admin/v1; empty = admin API on loopback only. It is also the master
    credential: as a bearer key on ``/v1`` it acts as the ``admin`` account."""
    auth: Literal["", "keys", "open"] = ""
    """``keys``: every ``/v1`` request needs a valid API key (see docs/accounts.md);
    ``open``: any caller is served (as nobody: nothing is charged). Empty (the default):
    ``open`` while the gateway listens on loopback only, else the gateway refuses to start
    until you choose (``open`` beyond loopback is allowed, with a warning at start)."""
    database: str = ""
    """Where accounts, keys, groups, credits and the usage ledger live: empty = SQLite at
    ``<data_dir>/tooti.sqlite3``; ``postgresql://user:pass@host/db`` = PostgreSQL, which
    any number of gateways can share."""
    access_log: bool = True
    """One line per ``/v1`` request on the ``tooti.access`` logger, at INFO, when it ends
    (request id, key id, model, node, status, tokens, TTFT, duration; see
    :mod:`tooti.gateway.access_log`). Shown whatever ``log_level`` says; false = none."""
    console: bool = False
    """Serve the web console under ``/console`` on the gateway's port (sign-in pages for
    users, operators and admins; see docs/console.md). Needs the accounts database."""
    gateway_id: str = ""
    """This gateway's name among gateways sharing a database (its credit leases carry
    it, and a restart reconciles its own); empty = a random id generated once and kept in
    ``<data_dir>/gateway-id`` (so each gateway needs its own data dir)."""
    reserve_completion_tokens: PositiveInt = 4096
    """Completion tokens a request without ``max_tokens`` reserves credit for (its
    prompt bound plus these, at the highest price among the nodes that may serve it);
    what it really used is settled after, and the rest returned."""
    max_body_bytes: PositiveInt = 4_194_304
    """Largest request body accepted (413 above)."""
    max_json_depth: PositiveInt = 128
    """Deepest nesting of arrays and objects accepted in a request body (400 above)."""
    max_upload_bytes: PositiveInt = 26_214_400
    """Largest multipart upload (``/v1/audio/transcriptions``) passed through to a node
    (413 above); it is streamed, never held whole."""
    max_form_prefix_bytes: PositiveInt = 1_048_576
    """Most bytes of a multipart upload the gateway reads ahead to find its ``model``
    field (400 if the field is not complete within them)."""
    header_timeout: PositiveFloat = 10.0
    """Seconds a client has to send a whole request head, counted from its first byte
    however slowly the rest trickles in (then 408 and the connection closes)."""
    body_timeout: PositiveFloat = 60.0
    """Seconds a client has to send a whole request body once its head arrived (408)."""
    keep_alive_timeout: PositiveFloat = 15.0
    """Seconds an HTTP connection may wait for its first or next request before it is
    closed."""
    send_timeout: PositiveFloat = 60.0
    """Seconds one write to an HTTP client may wait for the client to read; a client that
    stops reading for longer is disconnected. A non-streamed answer, whose bytes the
    gateway holds until they are sent, must be taken whole within this time too."""
    max_connections: PositiveInt = 10_000
    """Most client connections (HTTP and tunnels) open at once, at most the process's
    file-descriptor limit less a reserve; more get 503 and are closed."""
    max_connections_per_ip: PositiveInt = 256
    """Most connections one client IP (an IPv6 /64) may have open at once; more get 429
    and are closed (closed at once on a TLS port). Tunnels that proved their node's
    identity do not count (many nodes may share an address)."""
    connection_rate: PositiveFloat = 100.0
    """New connections per second one client IP (an IPv6 /64) may open, on average, after
    a burst of ``connection_burst``; more get 429 and are closed (closed at once, before
    any TLS handshake, on a TLS port)."""
    connection_burst: PositiveInt = 200
    """New connections one client IP may open at once before ``connection_rate`` applies."""
    tunnel_handshake_rate: PositiveFloat = 5.0
    """Tunnel upgrades per second one client IP (an IPv6 /64) may start, on average;
    more get 429."""
    tunnel_handshake_burst: PositiveInt = 50
    """Tunnel upgrades one client IP may start at once before the rate applies."""
    tunnel_handshakes_per_ip: PositiveInt = 32
    """Tunnel handshakes one client IP may have unfinished at once (upgraded, not yet
    proven); more get 429."""
    max_attempts: PositiveInt = 3
    """Nodes tried for one request before giving up (failover before first byte)."""
    first_byte_timeout: PositiveFloat = 60.0
    """Seconds to wait for a node's response head before trying another."""
    request_timeout: PositiveFloat = 600.0
    """Upper bound on one whole request, streaming included."""
    queue_timeout: PositiveFloat = 30.0
    """Seconds a request may wait for a free slot when every node is full (then 429)."""
    max_queue: PositiveInt = 1024
    """Requests that may wait for a slot at once; more get 429 at once."""
    max_response_bytes: PositiveInt = 67_108_864
    """Largest non-streamed answer the gateway collects from a node (502 above)."""
    max_buffered_bytes: PositiveInt = 268_435_456
    """Bytes of non-streamed answers held at once, over every request; an answer that
    would go beyond waits for room (at most ``buffer_wait``), then gets 503."""
    buffer_wait: PositiveFloat = 10.0
    """Seconds an answer may wait for room under ``max_buffered_bytes``."""
    prompt_token_allowance: PositiveInt = 4096
    """Prompt tokens a node may report beyond one per byte of the request body (a chat
    template, a server's system prompt); more is a violation."""
    media_token_allowance: PositiveInt = 16_384
    """Further prompt tokens allowed per image, audio, video or file part of a chat
    request (their tokens are not in the body's bytes)."""
    cooldown_failures: PositiveInt = 3
    """Failures of one node's model within ``cooldown_window`` that start a cooldown."""
    cooldown_window: PositiveFloat = 60.0
    """Seconds over which failures are counted."""
    cooldown_seconds: PositiveFloat = 5.0
    """First cooldown; each repeated cooldown doubles it."""
    cooldown_max_seconds: PositiveFloat = 300.0
    """Longest cooldown."""
    peer_ban_seconds: PositiveFloat = 60.0
    """Seconds a peer that violated the protocol (bad values, floods) is refused (a node
    caught through a relay: its route through that relay only)."""
    relay_strikes: NonNegativeInt = 0
    """A relay through which this many different nodes violated the protocol within
    ``relay_strike_seconds`` is itself cut off and banned; 0 (the default) = never. An
    honest relay cannot vouch for what its nodes say in END, so with strikes on, anyone
    holding the relay's join token can mint a few lying nodes and get it banned: turn
    them on only for relays whose operators answer for their nodes."""
    relay_strike_seconds: PositiveFloat = 600.0
    """Seconds over which violations through a relay are counted (``relay_strikes``)."""
    max_identity_bindings: PositiveInt = 10_000
    """Most chosen node names bound to keys here; a new name beyond it is refused
    (derived ``tooti-...`` ids need no binding)."""
    groups: dict[str, GroupSettings] = {}
    """Named node groups (``[gateway.groups.NAME]``): a request of a group is routed only
    to that group's nodes, an ungrouped request only to ungrouped nodes."""
    aliases: dict[str, AliasTarget] = {}
    """Public model names mapped to node model ids (``[gateway.aliases]``), see
    :mod:`tooti.gateway.aliases`."""
    cors: CorsSettings = msgspec.field(default_factory=CorsSettings)
    """Browsers' cross-origin access (``[gateway.cors]``), see :mod:`tooti.gateway.cors`."""


class BackendSettings(_Table):
    """One backend a node serves from."""

    type: BackendType = "simulated"
    """Backend type name: ``openai``, ``llamacpp``, ``simulated``."""
    url: str = ""
    """Base URL for server backends, e.g. ``http://127.0.0.1:8000/v1``."""
    api_key: str = ""
    """Upstream API key (sent as a bearer token), if the server needs one."""
    models: list[str] = []
    """Models to advertise; empty = discover from the server."""
    max_concurrency: PositiveInt = 8
    """Concurrent requests per model advertised to gateways."""
    price_input: NonNegativeFloat = 0.0
    """Price per 1M prompt tokens advertised for this backend's models."""
    price_output: NonNegativeFloat = 0.0
    """Price per 1M completion tokens advertised for this backend's models."""
    poll_interval: PositiveFloat = 30.0
    """Seconds between model-list refreshes."""
    options: dict[str, Any] = {}
    """Backend-specific options (e.g. simulated ``ttft``, ``tokens_per_second``)."""
    endpoints: list[str] = []
    """The ``/v1`` endpoints this backend's models serve, announced to gateways (one of
    ``chat/completions``, ``completions``, ``embeddings``, ``rerank``,
    ``audio/transcriptions``, ``audio/speech``, ``images/generations``, ``responses``);
    empty = the backend's own default (the openai backend: the first three, since a
    remote server cannot be asked which it serves)."""


class NodeSettings(_Table):
    """A node: wraps backends and dials out to gateways."""

    peers: list[str] = []
    """Tunnel URLs of gateways/relays to dial (``ws://host:port/tooti/v1/tunnel``)."""
    join_token: str = ""
    """Token presented to peers in the Authorization header."""
    id: str = ""
    """Node id; empty = generated once and kept in the data dir."""
    labels: dict[str, str] = {}
    """Free-form labels sent in HELLO (e.g. ``region = "eu"``)."""
    backends: list[BackendSettings] = []
    """Backends to serve from; empty = the role's default."""
    health_interval: PositiveFloat = 5.0
    """Seconds between backend health checks (a sick backend's models are withdrawn)."""
    reconnect_initial: PositiveFloat = 0.25
    """First re-dial delay in seconds (doubles each failure, with jitter)."""
    reconnect_max: PositiveFloat = 10.0
    """Longest re-dial delay in seconds."""
    admin_listen: str = ""
    """HOST:PORT of a small admin API (``/healthz``, ``/admin/v1/network`` for ``tooti
    peers``) when the process runs no gateway or relay; empty = none. Uses
    ``gateway.admin_key`` (loopback only without one)."""


class RelaySettings(_Table):
    """A relay: accepts node tunnels like a gateway (on ``gateway.listen``, with the
    gateway's auth and limits) and forwards their streams to upstream peers."""

    peers: list[str] = []
    """Tunnel URLs of upstream gateways/relays to dial (``--peer`` sets this and
    ``node.peers``; a node beside a relay in one process attaches to it and does not
    dial)."""
    join_token: str = ""
    """Token presented to upstream peers."""
    id: str = ""
    """Relay id; empty = derived from the relay's own key in the data dir."""
    max_streams: PositiveInt = 1024
    """Most streams forwarded at once, over every node behind this relay."""
    max_streams_per_node: PositiveInt = 256
    """Most streams forwarded at once to one node."""
    reconnect_initial: PositiveFloat = 0.25
    """First re-dial delay in seconds (doubles each failure, with jitter)."""
    reconnect_max: PositiveFloat = 10.0
    """Longest re-dial delay in seconds."""
    advertise_interval: PositiveFloat = 0.05
    """Shortest time between two ROUTES updates sent upstream (changes are batched)."""


class NetworkSettings(_Table):
    """Discovery: which peers a node or relay dials beyond its configured ones, and
    which addresses a gateway or relay tells its dialers about."""

    bootstrap_peers: list[str] = []
    """Tunnel URLs always dialed in addition to ``node.peers`` / ``relay.peers``
    (host names are resolved at each dial)."""
    discover: bool = False
    """Also dial peers learned from WELCOME (other public gateways/relays), up to
    ``max_peers``; off = never dial an address only a peer claimed."""
    max_peers: PositiveInt = 8
    """Most peers dialed or connected at once; the others (configured, bootstrap or
    discovered) stand by and take over, in turn, when a session fails."""
    public_url: str = ""
    """This gateway's/relay's tunnel URL as others reach it (sent in HELLO when it
    dials, and in WELCOME); empty = not public."""
    advertise: list[str] = []
    """Other public tunnel URLs this gateway/relay tells its dialers about in WELCOME."""
    discover_token: str = ""
    """Token presented to discovered peers (never the join token, which goes only to
    configured and bootstrap peers); empty = none."""
    peer_ca: str = ""
    """PEM file of CA certificates trusted for ``wss://`` peers besides the system's
    trust store (a private CA); peers' certificates and host names are always checked."""


class RoutingSettings(_Table):
    """How the gateway chooses a node."""

    policy: str = "least-loaded"
    """Routing policy name (from the ``tooti_routing_policies`` hook)."""
    options: dict[str, Any] = {}
    """Options passed to the policy's factory."""


class BillingSettings(_Table):
    """What the gateway does with every request's usage."""

    plugins: list[str] = msgspec.field(default_factory=lambda: ["credits"])
    """Billing plugins (from the ``tooti_billing`` hook), all active, in order. The
    built-in ``credits`` (prepaid credit, earnings and the usage ledger; see
    docs/accounts.md) is also known by its old name ``usage-ledger``: name only one."""
    options: dict[str, Any] = {}
    """Options passed to every billing plugin's factory (``credits``: ``fee_bps``,
    ``lease_credits``, ``lease_idle``, ``lease_ttl``)."""


class Settings(_Table):
    """Everything one ``tooti`` process needs."""

    roles: list[Role] = []
    """Roles to run; empty = gateway + node on the embedded llamacpp backend."""
    data_dir: str = "~/.local/share/tooti"
    """Where persistent state (node identity, ledger) lives."""
    log_level: LogLevel = "info"
    """Logging level: debug, info, warning, error."""
    log_format: LogFormat = "text"
    """``text`` (one readable line per record) or ``json`` (one JSON object per line, for
    log shippers: ``ts``, ``level``, ``logger``, ``msg``, and an access record's fields)."""
    drain_grace: NonNegativeFloat = 10.0
    """Seconds in-flight streams may take to finish after SIGINT/SIGTERM."""
    plugins_dir: str = ""
    """Directory of extra plugin files (``*.py``) to load; empty = none."""
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    node: NodeSettings = msgspec.field(default_factory=NodeSettings)
    relay: RelaySettings = msgspec.field(default_factory=RelaySettings)
    network: NetworkSettings = msgspec.field(default_factory=NetworkSettings)
    tunnel: TunnelSettings = msgspec.field(default_factory=TunnelSettings)
    routing: RoutingSettings = msgspec.field(default_factory=RoutingSettings)
    billing: BillingSettings = msgspec.field(default_factory=BillingSettings)
