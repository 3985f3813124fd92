"""What the routes talk to: the `Backend` interface (`base`), the in-process engine (`embedded`) and the
Redis queue (`redis`)."""
