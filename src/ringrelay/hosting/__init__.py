"""Ways to run the relay besides one `ringrelay serve` process: Azure Functions, several workers."""
