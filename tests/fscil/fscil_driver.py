"""Runs the FSCIL protocol in a process of its own, for the DDP and kill -9 tests.

``python tests/fscil/fscil_driver.py <fscil arguments>`` registers the toy datasets of ``fscil_helpers`` and calls
``fscil_main``. ``FSCIL_KILL`` makes the process SIGKILL itself: ``fit:<method>:<session>:<epoch>:<batch>`` after
that training batch (mid-session), ``after:<method>:<session>`` once that session's files are written (between
sessions). Lightning's DDP launcher re-runs this script for the other ranks.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fscil_helpers  # noqa: F401  (registers fscil_toy)
import torch
from lightning.pytorch import Callback

from visadapt.protocols.fscil import fscil_main


class KillMidSession(Callback):
    def __init__(self, method: str, session: int, epoch: int, batch: int) -> None:
        self.where = (method, session, epoch, batch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (module.name, module.info.session, trainer.current_epoch, batch_idx) == self.where:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    torch.set_num_threads(1)
    kill = os.environ.get("FSCIL_KILL", "").split(":")
    callbacks, after = [], None
    if kill[0] == "fit":
        callbacks.append(KillMidSession(kill[1], *map(int, kill[2:5])))
    elif kill[0] == "after":

        def after(method, session):
            if (method, session) == (kill[1], int(kill[2])):
                os.kill(os.getpid(), signal.SIGKILL)

    fscil_main(sys.argv[1:], after_session=after, callbacks=callbacks)


if __name__ == "__main__":
    main()
