"""The controller: ring host, ZMQ router, ingress, lease reaper, HTTP gateway, CLI."""
