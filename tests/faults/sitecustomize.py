"""A fault injector for the real node process (a test double for a power cut or a kill -9 at a
chosen instant, which no test could hit by timing alone).

With ``DN_KILL=point`` in its environment and this folder first on ``PYTHONPATH``, the node
sends itself SIGKILL the first time it reaches ``point``:

- ``record_replace``: the receiver has written new content for a known instance into the
  spool and is about to record it in the job store;
- ``spool_remove``: the receiver is about to delete a spooled file (the old copy of an
  instance that moved to another study or series).

Python imports ``sitecustomize`` at start-up; the analysis process (spawned) is left alone.
"""

import os
import signal
import sys

_POINT = os.environ.get("DN_KILL")

if _POINT and "spawn_main" not in " ".join(sys.argv):
    from dicom_node.store import jobs as _jobs
    from dicom_node.store import spool as _spool

    def _hit(name: str) -> None:
        if name == _POINT:
            sys.stderr.write(f"fault injector: SIGKILL at {name}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    _record = _jobs.JobStore.record_instance
    _remove = _spool.Spool.remove

    def _recording(self, rec):  # type: ignore[no-untyped-def]
        if self.instance_location(rec.sop_instance_uid) is not None:
            _hit("record_replace")
        return _record(self, rec)

    def _removing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _hit("spool_remove")
        return _remove(self, *args, **kwargs)

    _jobs.JobStore.record_instance = _recording  # type: ignore[method-assign]
    _spool.Spool.remove = _removing  # type: ignore[method-assign]
