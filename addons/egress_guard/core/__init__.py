"""Pure decisions and policy: plain values in, plain values out. Imports nothing from the
other layers and nothing from mitmproxy, so every rule is testable without a proxy."""
