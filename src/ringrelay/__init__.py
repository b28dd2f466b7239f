"""ringrelay: Azure Communication Services events in, phone pushes out."""

__version__ = "0.1.0"
