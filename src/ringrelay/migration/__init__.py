"""Moving registrations in and out: Microsoft's sample's MongoDB export in, JSON lines out."""
