"""The run engine: agents, the agent loop, the executor and the event log. No Flask in here."""
