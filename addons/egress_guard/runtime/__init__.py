"""The mitmproxy-facing runtime: the addon mitmproxy sees, the adapters it calls in order,
the body gate that holds request bodies until their verdict, and the per-flow state."""
