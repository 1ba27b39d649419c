"""What every accepting role (gateway, relay) shares: the listener, tunnel admission and
join tokens, the registry of live peers, candidates, relay advertisements, identities."""
