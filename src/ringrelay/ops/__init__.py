"""Operations: `ringrelay doctor`, call traces and the dashboard."""
