"""Azure resources around the relay, as code: the Event Grid subscription that feeds it."""
