"""The one tool of the benchmark's agents.

The scripted model calls it with the user's message and then answers "echo returned
<message>.", split into the agent's ``content_deltas``: the load client sets the size of every
delta through the length of the message it sends.
"""

from __future__ import annotations


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text
