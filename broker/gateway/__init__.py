"""The HTTP gateway: API, LightX2V-compatible routes, /metrics and the dashboard (app.py)."""
