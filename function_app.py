"""Azure Functions entry point (Python v2 programming model): the whole HTTP API through
`func.AsgiFunctionApp`, plus the Event Grid trigger of Microsoft's sample, both sharing one relay
per worker (src/ringrelay/hosting/functions.py). Settings come from the app settings; see the
README, "Deploy: Azure Functions"."""

from __future__ import annotations

import sys
from pathlib import Path

import azure.functions as func

# The package is deployed as source beside this file (requirements.txt carries its dependencies).
_SRC = Path(__file__).resolve().parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from ringrelay.hosting.functions import host_from_environment  # noqa: E402

# Built at import, once per worker; the store and providers start on the first invocation.
host = host_from_environment()

# Anonymous at the Functions level: ringrelay authenticates the registrar API itself (bearer
# tokens, API keys) and the webhook by its own `?code=` secret, which a Functions key would
# otherwise consume (Functions reads the same `code` query parameter).
app = func.AsgiFunctionApp(app=host.asgi, http_auth_level=func.AuthLevel.ANONYMOUS)


@app.function_name(name="IncomingCallEventHandler")  # the sample's function name
@app.event_grid_trigger(arg_name="event")
async def incoming_call_event_handler(event: func.EventGridEvent) -> None:
    """Raises on a transient failure: the invocation fails and Event Grid retries the event."""
    await host.handle_trigger_event(event.id, event.event_type, event.event_time, event.get_json())
