"""HTTP routes: the Event Grid webhook, the native registry API and the sample-compatible routes."""
