"""The tools of the benchmark's agents.

The scripted model calls it with the user's message and then answers "echo returned
<message>.", split into the agent's ``content_deltas``: the load client sets the size of every
delta through the length of the message it sends.
"""

from __future__ import annotations


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


def lookup_order(order_id: str) -> str:
    """Look an order up by its id: what the MCP server's tool of that name answers
    (bench/mcp_bench.py compares the two)."""
    return f"Order {order_id}: shipped"
