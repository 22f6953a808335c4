"""An HL7 MLLP receiver on loopback for the export tests: real sockets, python-hl7's server.

It keeps every message it receives and answers each with an ACK whose code the test sets
(AA to accept, AE or AR to refuse, with a text), like a RIS interface engine.
"""

from __future__ import annotations

import asyncio
import threading

import hl7
from hl7.mllp import start_hl7_server

from tests.conftest import free_port


class MllpReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.ack_code = "AA"
        self.messages: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mllp-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the MLLP receiver did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handle(reader, writer) -> None:  # type: ignore[no-untyped-def]
            try:
                while not writer.is_closing():
                    message = await reader.readmessage()
                    self.messages.append(str(message))
                    code = self.ack_code
                    ack = str(message.create_ack(code))
                    if code != "AA":
                        control_id = str(message.segment("MSH")(10))
                        ack = ack.replace(f"MSA|{code}|{control_id}", f"MSA|{code}|{control_id}|test RIS refuses it")
                    writer.writemessage(hl7.parse(ack))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        self._server = self._loop.run_until_complete(
            start_hl7_server(handle, host="127.0.0.1", port=self.port, encoding="utf-8")
        )
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def _shutdown() -> None:
            self._server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
