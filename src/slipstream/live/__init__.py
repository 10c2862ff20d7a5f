"""Event sinks, the dashboard, the weight store and serving (issue: real-time training)."""
