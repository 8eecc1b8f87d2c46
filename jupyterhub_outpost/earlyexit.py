"""Servers that end right after their start: the user is told why.

A Spawner's ``start()`` returns once the server's process runs, not once
it answers. A server that exits at once (jupyter refusing to run as root,
a missing module, a bad argument) would leave the user waiting until the
hub gives up ("didn't respond in 30 seconds"), with the cause only in a log
of the Outpost. For ``early_exit_window`` seconds after the start of a
server whose output it keeps (LocalProcessSpawner and its subclasses), the
Outpost polls the server, each second at first and less often later (a
dozen polls in 20 s); when it ends, the hub is sent a progress
event with the exit status and the last lines of the server's output (where
the Outpost keeps it, see
:func:`~jupyterhub_outpost.spawners.localprocess.open_output`), which the
user sees at once on the hub's spawn page, and the spawn history keeps it.
The hub's next poll then gets the exit status and ends the start.

The event is not marked ``failed``: the OutpostSpawner answers a failed
event that arrives while the hub waits for the server's first answer by
cancelling the spawn, and JupyterHub then reports the server ready for a
moment before it stops it. The hub's own poll ends the start cleanly.
"""

import asyncio
import html
import time

from .log import secrets

# seconds between the polls of a new server: servers that fail at once end
# within the first seconds
POLL_INTERVALS = (1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3)
TAIL_LINES = 20


def failure_event(status, seconds, tail):
    """The progress event that tells the user the server ended"""
    summary = f"The server exited with status {status} {seconds:.0f} s after it started"
    if tail:
        summary += "; its last output:"
    escaped = html.escape(tail)
    return {
        "progress": 100,
        "message": f"{summary}\n{tail}" if tail else summary,
        "html_message": f"<details open><summary>{html.escape(summary)}</summary><pre>{escaped}</pre></details>"
        if tail else html.escape(summary),
    }  # fmt: skip


class EarlyExitWatch:
    """Watches each new server for ``window`` seconds (0: not at all)"""

    def __init__(self, manager, window, read_tail):
        self.manager = manager
        self.window = window
        self.read_tail = read_tail  # path -> text, in a thread
        self.watching = set()

    def watch(self, managed):
        if self.window <= 0:
            return
        task = asyncio.ensure_future(self._watch(managed, time.monotonic()))
        self.watching.add(task)
        task.add_done_callback(self.watching.discard)

    def _still_ours(self, managed):
        return self.manager.active.get(managed.record.key) is managed and managed.stop_call is None

    async def _watch(self, managed, began):
        manager = self.manager
        try:
            for interval in (*POLL_INTERVALS, *[POLL_INTERVALS[-1]] * int(self.window)):
                if time.monotonic() - began + interval > self.window:
                    return
                await asyncio.sleep(interval)
                if not self._still_ours(managed):
                    return
                try:
                    status = await managed.poll(manager.calls, manager.app.poll_timeout)
                except Exception:
                    continue  # can't tell: the hub's own polls decide
                if status is None:
                    continue
                if not self._still_ours(managed):
                    return  # stopped on purpose meanwhile
                await self._report(managed, status, time.monotonic() - began)
                return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            manager.log.warning("%s - watching the new server failed: %s", managed.log_name, e)
        finally:
            managed.events = []

    async def _report(self, managed, status, seconds):
        manager = self.manager
        loop = asyncio.get_running_loop()
        tail = await loop.run_in_executor(None, self.read_tail, managed.output_path, TAIL_LINES)
        tail = secrets.scrub(tail)
        manager.log.warning("%s - the server exited with status %s %.0f s after its start",
                            managed.log_name, status, seconds)  # fmt: skip
        event = failure_event(status, seconds, tail)
        await manager._send_event(managed, event)
        await manager._record_history(
            manager.history.end_start, managed.record.key, "failed", managed.events, event["message"]
        )

    async def stop(self):
        for task in list(self.watching):
            task.cancel()
        await asyncio.gather(*self.watching, return_exceptions=True)
