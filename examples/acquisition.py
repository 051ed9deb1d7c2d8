"""A long acquisition seen, bounded and stopped from outside: invocations.

    python -m examples.acquisition [thread|process]

One task starts a long cooperative acquisition; a second one (standing in for
a colleague's dashboard) finds it among the running invocations and cancels
it by id; the acquisition stops within one step and the next call starts at
once. Then a call whose deadline passes while it waits in the queue never
runs. Last, an acquisition is submitted (detached: it would outlive this
client), its log is followed live, and it is stopped through its handle.
"""

from __future__ import annotations

import logging
import sys

import anyio

from remote_exec import (
    DeadlineExceeded,
    Executor,
    InvocationCancelled,
    ProcessExecutor,
    ThreadExecutor,
    apply_executor,
    cancellable_sleep,
    current_invocation_id,
)

log = logging.getLogger("spectrometer")


class Spectrometer:
    def __init__(self) -> None:
        self.spectra: list[int] = []

    @apply_executor
    def acquire(self, n: int) -> int:
        """Take ``n`` spectra, 50 ms each; stops when asked to."""
        print(f"acquisition {current_invocation_id()} started", flush=True)
        try:
            for i in range(n):
                cancellable_sleep(0.05)  # exposure: cut short by a cancel
                self.spectra.append(i)
                log.info("spectrum %d taken", i)  # kept in this invocation's log
        except InvocationCancelled:
            print(f"stopped after {len(self.spectra)} spectra", flush=True)
            raise
        return len(self.spectra)

    @apply_executor(timeout=0.2)
    def dark_frame(self) -> str:
        """Worth taking only within 0.2 s of asking."""
        print("dark frame taken", flush=True)
        return "dark"

    @apply_executor
    def count(self) -> int:
        return len(self.spectra)


async def dashboard(executor: Executor) -> None:
    """Find the running acquisition, show it, cancel it by id."""
    with anyio.fail_after(10):
        while True:  # another client's view: poll it
            running = await executor.list_invocations(status="running")
            if running:
                break
            await anyio.sleep(0.05)
    (info,) = running
    print(f"dashboard sees {info.instance}.{info.method} {info.status}", flush=True)
    after = await executor.cancel_invocation(info.id)
    print(f"dashboard asked {after.id} to stop", flush=True)


async def main(kind: str = "thread") -> None:
    executor: Executor = ProcessExecutor() if kind == "process" else ThreadExecutor()
    async with executor:
        spectrometer = Spectrometer()
        async with executor.remote_instance(spectrometer, "spectrometer"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(dashboard, executor)
                try:
                    await spectrometer.acquire(10_000)  # 8 minutes, uninterrupted
                except InvocationCancelled:
                    print("the acquisition was cancelled", flush=True)
            print(f"next call at once: {await spectrometer.count()} spectra kept")

            # A call queued behind a long one, past its own deadline, never runs.
            async with anyio.create_task_group() as tg:
                tg.start_soon(spectrometer.acquire, 10)  # 0.5 s
                await anyio.sleep(0.05)  # let it start first
                try:
                    await spectrometer.dark_frame()
                except DeadlineExceeded as exc:
                    print(f"dark frame: {exc.where}, never taken", flush=True)
            for info in await executor.list_invocations(instance="spectrometer"):
                print(f"{info.method:10} {info.status:9} {info.error or ''}")

            # Submitted: it runs on whatever happens to this task; its log, live.
            invocation = await executor.submit(spectrometer.acquire, 10_000)
            async with invocation.follow_log() as records:
                async for record in records:  # ends when the invocation does
                    print(f"live: {record.level} {record.message}", flush=True)
                    if record.message == "spectrum 2 taken":
                        await invocation.cancel()
            try:
                await invocation.result()
            except InvocationCancelled:
                info = await invocation.info()
                print(f"submitted acquisition {info.status}, {len(info.log)} records kept")


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:2])
