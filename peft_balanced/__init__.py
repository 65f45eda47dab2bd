"""peft-balanced: balanced low-rank adapters as PEFT plugins."""
