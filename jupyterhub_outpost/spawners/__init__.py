"""What particular Spawner families need from the Outpost."""
