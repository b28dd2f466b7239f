"""Events in: webhook ingest (both schemas) and one handler module per event kind."""
