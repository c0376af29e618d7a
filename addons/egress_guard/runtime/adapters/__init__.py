"""Adapters: the mitmproxy side of each concern — turn a flow into plain values, call the
pure decision functions, carry out the answer. ``gateway.EgressGuard`` calls them in order."""
