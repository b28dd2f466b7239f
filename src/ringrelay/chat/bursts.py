"""Coalescing (`RINGRELAY_CHAT_COALESCE_SECONDS`): messages of one thread to one recipient that
arrive within the window of each other share one notification entry on the phone.

Every message is still pushed (its ledger entry, retries and outcome stay as for any push); what
changes is what the push says: the count of messages in the burst and the newest text, under the
thread's collapse id, so the phone replaces its entry instead of adding one. Holding messages
back to send fewer pushes would need a timer that outlives the webhook's answer, and a message
lost with the process would never be pushed: the ledger's guarantee matters more.

The counts live in this process: with several instances behind a load balancer, each counts the
messages it saw (the entry is still one; the count may be low).
"""

from __future__ import annotations

from collections import OrderedDict

MAX_TRACKED = 100_000  # (recipient, thread) pairs remembered; the oldest are forgotten first


class ThreadBursts:
    def __init__(self, window_seconds: float) -> None:
        self.window = window_seconds
        # (recipient, thread) -> (time of the burst's last message, messages in the burst,
        # message ids seen: a redelivered event must not count twice)
        self._bursts: OrderedDict[tuple[str, str], tuple[float, int, set[str]]] = OrderedDict()

    def count(self, recipient: str, thread_id: str, message_id: str, now: float) -> int:
        """Messages in the burst this one belongs to, itself included (1 when off)."""
        if self.window <= 0:
            return 1
        key = (recipient, thread_id)
        last = self._bursts.pop(key, None)
        if last is not None and now - last[0] <= self.window:
            seen = last[2]
            if message_id in seen:
                self._bursts[key] = last
                return last[1]
            seen.add(message_id)
            burst = (now, last[1] + 1, seen)
        else:
            burst = (now, 1, {message_id})
        self._bursts[key] = burst
        while len(self._bursts) > MAX_TRACKED:
            self._bursts.popitem(last=False)
        return burst[1]
