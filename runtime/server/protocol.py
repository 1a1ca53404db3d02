"""uvicorn's HTTP/1.1 protocol with a deadline for the request head.

uvicorn closes idle keep-alive connections, but a connection that never sends a complete request
head (nothing at all, or a byte now and then: "slowloris") stays open forever and holds a socket.
Here every connection must deliver a complete head within `header_timeout` seconds of connecting,
or of starting the next request on a kept-alive connection; otherwise it is closed. The body's
deadline is the body limit middleware's (it answers 408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class HeadTimeoutProtocol(H11Protocol):
    header_timeout = 10.0  # set per server by `protocol_with_timeout`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self._between_requests():
            self._arm()  # the next request on a kept-alive connection: its head gets a deadline too
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if not self._between_requests():
            self._disarm()  # the head is complete: the request runs

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expire(self) -> None:
        self._head_deadline = None
        if self._between_requests() and not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request head in %.0f s", self.header_timeout)
            self.transport.close()


def protocol_with_timeout(header_timeout: float) -> type[HeadTimeoutProtocol]:
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"header_timeout": header_timeout})
