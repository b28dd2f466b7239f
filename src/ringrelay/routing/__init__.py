"""Call routing: rules with Event Grid's advanced-filter semantics, PSTN number assignment, and
Redirect / Reject through Call Automation, with a loop guard (README, "Call routing")."""
