# %% [markdown]
# # remote-exec in a notebook
#
# Each `# %%` line starts a cell: Jupyter (through jupytext), VS Code and
# PyCharm run them one at a time. `python examples/notebook.py` runs them all
# as a plain script.
#
# Two ways in: the blocking facade (`BlockingExecutor`, no `await`: cells,
# scripts, Qt apps), and the async API with top-level `await`, which Jupyter
# and IPython accept in a cell.

# %%
import sys
import threading
from collections.abc import Iterator

import anyio

from remote_exec import BlockingExecutor, ThreadExecutor, apply_executor, apply_generator_executor


class Stage:
    """A motorised stage. A class defined in a notebook suits a ThreadExecutor;
    a ProcessExecutor or a daemon must import it, so keep it in a module there
    (examples/instrument.py is one)."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self.position = 0.0
        self.moves: list[float] = []

    def on_move(self, x: float) -> None:
        """Callback: runs on the calling side with each result of ``move_to``."""
        self.moves.append(x)

    @apply_executor(callback=on_move)
    def move_to(self, x: float) -> float:
        """A blocking hardware call: runs in the stage's own worker thread."""
        self.position = x
        return self.position

    @apply_executor
    def where(self) -> str:
        return threading.current_thread().name

    @apply_generator_executor
    def scan(self, step: float, n: int) -> Iterator[float]:
        try:
            for i in range(n):
                self.position = i * step
                yield self.position
        finally:
            print("scan closed")  # runs where the stage lives, even when stopped early


# %% [markdown]
# ## Without `await`: the blocking facade
#
# Cells cannot share one `with` block, so start the facade in one cell and
# stop it in the last; in a script, `with BlockingExecutor(...) as bx:` does
# both. It runs the executor on an event loop in a background thread.

# %%
bx = BlockingExecutor(ThreadExecutor()).start()
stage = Stage()
bx.create_remote_instance(stage, "stage")  # `with bx.remote_instance(...)` in a script

# %%
print(bx.run(stage.move_to, 2.5), stage.moves)  # the result, and the callback's record
print("ran in", bx.run(stage.where))

# %%
with bx.gen(stage.scan, 0.5, 1000) as positions:  # leaving the block closes the generator
    for x in positions:
        if x >= 1.0:
            break
print(list(bx.gen(stage.scan, 0.25, 4)))

# %%
print(bx.get_remote_objects())
bx.delete_remote_instance(stage)
bx.stop()


# %% [markdown]
# ## With `await`: the async API
#
# In Jupyter a cell may `await` at its top level, so there the body of this
# function can be a cell of its own, as it stands.


# %%
async def acquire() -> None:
    stage = Stage()
    async with ThreadExecutor() as executor, executor.remote_instance(stage, "stage"):
        print(await stage.move_to(1.0), "ran in", await stage.where())
        async with stage.scan(0.5, 3) as positions:
            print([x async for x in positions])


# %% [markdown]
# A notebook's event loop runs already: there, write `await acquire()`. A
# script has none yet, so it starts one.

# %%
if "ipykernel" in sys.modules:
    print("in Jupyter: run `await acquire()` in a cell")
else:
    anyio.run(acquire)
