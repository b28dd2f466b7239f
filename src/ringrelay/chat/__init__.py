"""Chat pushes: the event's message, the two delivery formats (the Chat SDK's encrypted push and
a visible notification), the sealing of the apps' chat keys at rest, and per-thread mutes."""
