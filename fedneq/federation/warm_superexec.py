"""A warm SuperExec for a small device: torch imported once, each ClientApp a fork of it.

With Flower's default ``subprocess`` isolation a SuperNode starts a
``flower-superexec``, which starts a fresh ``flwr-clientapp`` process for
every message: each one imports Flower's runtime and torch again (tens of
seconds on a slow CPU), and a task whose ClientApp has not reported within
Flower's 30 s heartbeat interval is handed out again, so a slow device ends up
with several ClientApps importing torch at once. Run the SuperNode with
``--isolation process`` and this instead, next to it::

    python warm_superexec.py --runtime-api-address 127.0.0.1:9094 --insecure

It is Flower's own SuperExec loop (``run_superexec``) with one executor
swapped: the process imports torch and Flower's ClientApp runtime at start,
and launches each task by ``fork()``: the ClientApp starts at once and shares
the parent's pages until it writes them. One task runs at a time: a new task
ends the ClientApp still running, whose task is then stale (a ClientApp of a
run the SuperLink lost waits for its message forever, and would otherwise keep
the device from serving the resumed run).

This file imports only Flower and torch (what the device installs), so it can
be copied to a device on its own. docs/DEVICE_MEMORY.md has the measurements.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

__all__ = ["ForkExecutor", "main"]


class ForkExecutor:
    """A Flower SuperExec executor that runs each ClientApp task in a fork of this process."""

    def __init__(self) -> None:
        self.running: int | None = None  # the pid of the ClientApp being run, if any

    def reconcile(self) -> None:
        if self.running is not None:
            pid, _ = os.waitpid(self.running, os.WNOHANG)
            if pid:
                self.running = None

    def get_eligible_capacity(self, supported_task_types, **_kwargs):
        self.reconcile()
        # always take the next task: a new one while a ClientApp still runs means that one is
        # stale (its run ended, say a SuperLink restart, or the server gave up on its reply),
        # and launch() ends it first, so one ClientApp at a time still holds
        return set(supported_task_types), set()

    def wait_for_capacity(self, *_args, **_kwargs) -> None:
        if self.running is not None:
            os.waitpid(self.running, 0)
            self.running = None

    def end_running(self) -> None:
        """SIGKILL the ClientApp still running, if any, and reap it."""
        self.reconcile()
        if self.running is not None:
            try:
                os.kill(self.running, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait_for_capacity()

    def launch(self, spec):
        from flwr.supercore.superexec.executor import LaunchResult
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.end_running()  # a stale one (see get_eligible_capacity)
        pid = os.fork()
        if pid == 0:  # the ClientApp: Flower's own entry point, in this already warm process
            code = 0
            try:
                from flwr.supernode.runtime.run_clientapp import run_clientapp

                run_clientapp(
                    runtime_api_address=spec.runtime_api_address,
                    token=spec.token,
                    insecure=spec.insecure,
                    certificates=validate_and_resolve_root_certificates(
                        spec.root_certificates_path, spec.insecure
                    ),
                    parent_pid=None,
                    runtime_dependency_install=False,
                )
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported, then the fork ends
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.running = pid
        return LaunchResult.accepted()

    def close(self) -> None:
        self.wait_for_capacity()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's --port (its Runtime API)")  # fmt: skip
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    args = parser.parse_args(argv)

    import torch  # noqa: F401 - the point: imported once, before any fork
    import torch.nn  # noqa: F401
    import torch.optim  # noqa: F401
    from flwr.supercore.superexec import run_superexec as superexec
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    torch.set_num_threads(1)  # a forked child must not inherit a running thread pool
    superexec.get_executor = lambda *a, **k: ForkExecutor()
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
    )


if __name__ == "__main__":
    main()
