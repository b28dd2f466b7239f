"""Who may call: registrar JWTs, API keys, webhook secrets and Entra tokens, rate limits."""
