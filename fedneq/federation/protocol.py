"""The keys of the messages between the server and a client, in one place.

A strategy, the ClientApp and the server's round loop all read or write these
keys; naming them here keeps the two ends of the wire in step. The wire format
of the arrays themselves lives in :mod:`fedneq.federation.wire`.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT_KEY",
    "CONFIG_KEY",
    "FULL_BUDGET_KEY",
    "STATE_DIR_KEY",
    "STATE_RUN_KEY",
    "WIDTH_KEY",
    "WIDTH_METHODS",
]

# training config ("config" ConfigRecord of a train message), set by the server
CONFIG_KEY = "fedneq-config"  # the run's Config as JSON
ATTEMPT_KEY = "attempt"  # the server's try at this round, 0 first (seeds fault injection)
STATE_DIR_KEY = "client-state-dir"  # where to keep velocity state across a server restart
FULL_BUDGET_KEY = "full-budget"  # True: train every parameter, whatever the device's budget
WIDTH_KEY = "width-method"  # a width strategy's sub-model rule, one of WIDTH_METHODS

# Context.state of a client node
STATE_RUN_KEY = "velocity-run"  # the STATE_DIR_KEY the kept velocity belongs to

# the width sub-model methods a client can run (fedneq.federation.width_client)
WIDTH_METHODS = ("heterofl", "fjord", "fedrolex")
