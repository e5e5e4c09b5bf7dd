"""The local Ray node a simulation starts, without the daemons it never uses.

``ray.init`` on a machine with no cluster starts the GCS, the raylet with its
dashboard and runtime-env agents, and three Python daemons a simulation never
uses:

* the **log monitor**, which forwards the workers' output to the driver:
  idle when ``log_to_driver`` is off (``sims.run`` turns it off unless
  ``--verbose``);
* the **autoscaler's monitor**: one machine has nothing to scale;
* the **dashboard's API server**, started even with ``include_dashboard=False``,
  for job submission and the state API (``ray list actors``).

Each holds 50-75 MB (PSS), together ~170 MB of the ~370 MB that Ray's daemons
hold (docs/SCALE.md). ``ray.init`` takes no argument for them; inside
:func:`without_unused_daemons` a node that starts gets Ray's own switches for
the first two (``RayParams.include_log_monitor``, ``no_monitor``, what
``ray start --no-monitor`` sets) and no API server. A cluster that is attached
to rather than started keeps what it runs. ``keep_all=True`` (``sims.run
--verbose``) starts them all, for the workers' logs and ``ray list``.

If Ray's internals change so that the switches are not found, the node starts
as Ray starts it, with a warning (a test checks the daemons are absent).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["UNUSED_DAEMONS", "without_unused_daemons"]

UNUSED_DAEMONS = ("log_monitor.py", "autoscaler/_private/monitor.py", "dashboard/dashboard.py")

log = logging.getLogger("fedneq")


@contextmanager
def without_unused_daemons(keep_all: bool = False) -> Iterator[None]:
    """A local Ray node started inside runs no log monitor, autoscaler monitor or API server."""
    from ray._private import node, parameter

    params, node_cls = parameter.RayParams, node.Node
    init, start_api_server = params.__init__, getattr(node_cls, "start_api_server", None)
    switches = {"include_log_monitor", "no_monitor"} <= set(init.__code__.co_varnames)
    if keep_all or start_api_server is None or not switches:
        if not keep_all:
            log.warning("this Ray has no switches for its unused daemons: it starts them all")
        yield
        return

    def lean_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.include_log_monitor, self.no_monitor = False, True

    def no_api_server(self: Any, **_: Any) -> None:
        """The node's dashboard URL stays None, as for a node without a dashboard."""

    params.__init__, node_cls.start_api_server = lean_init, no_api_server
    try:
        yield
    finally:
        params.__init__, node_cls.start_api_server = init, start_api_server
