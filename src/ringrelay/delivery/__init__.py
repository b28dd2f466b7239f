"""Plans out: the dispatcher that claims, pushes, retries and records, and the provider router."""
