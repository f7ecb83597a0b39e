"""The controller: ring host, ZMQ router, ingress, lease reaper, Redis mirror, CLI."""
