"""What the broker and the workers share: wire schemas, config, rings, the Redis job store."""
