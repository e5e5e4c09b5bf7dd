"""The keys of the messages between the server and a client, in one place.

A strategy, the ClientApp and the server's round loop all read or write these
keys; naming them here keeps the two ends of the wire in step. The wire format
of the arrays themselves lives in :mod:`fedneq.federation.wire`.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS_RECORD",
    "ATTEMPT_KEY",
    "BUDGET_KEY",
    "CONFIG_KEY",
    "CONFIG_RECORD",
    "DATA_FINGERPRINT_KEY",
    "DATA_PARTITION_KEY",
    "DEVICE_KEY",
    "ELEMENT_KEY",
    "ELEMENT_METHODS",
    "EPOCHS_KEY",
    "FULL_BUDGET_KEY",
    "INFO_RECORD",
    "LOCAL_STEPS_KEY",
    "NUM_EXAMPLES_KEY",
    "SERVER_ROUND_KEY",
    "STATE_DIR_KEY",
    "STATE_RUN_KEY",
    "WIDTH_KEY",
    "WIDTH_METHODS",
    "WIDTH_OPTIONS_KEY",
]

# records of a message (Flower's FedAvg names for the first two)
ARRAYS_RECORD = "arrays"  # ArrayRecord: the packed global model, or a reply's upload
CONFIG_RECORD = "config"  # ConfigRecord of a train message: the keys below
INFO_RECORD = "info"  # ConfigRecord of a reply: what the node says about itself (DEVICE_KEY)

# training config (CONFIG_RECORD of a train message), set by the server
SERVER_ROUND_KEY = "server-round"  # the round, 1 first (Flower's FedAvg sets it too)
CONFIG_KEY = "fedneq-config"  # the run's Config as JSON
ATTEMPT_KEY = "attempt"  # the server's try at this round, 0 first (seeds fault injection)
STATE_DIR_KEY = "client-state-dir"  # where to keep velocity state across a server restart
FULL_BUDGET_KEY = "full-budget"  # True: train every parameter, whatever the device's budget
WIDTH_KEY = "width-method"  # a width strategy's sub-model rule, one of WIDTH_METHODS
WIDTH_OPTIONS_KEY = "width-options"  # JSON of its WidthOptions (absent: the defaults)
ELEMENT_KEY = "element-method"  # an element-wise strategy's sub-model rule, one of ELEMENT_METHODS

# a training reply: its metrics the server checks, and its INFO_RECORD
NUM_EXAMPLES_KEY = "num-examples"  # the reply's weight (FedAvg's weighted_by_key)
BUDGET_KEY = "budget-params"  # declared budget, selectable parameters per local epoch
EPOCHS_KEY = "local-epochs"  # declared number of local epochs (passes over its data)
LOCAL_STEPS_KEY = "local-steps"  # declared optimizer steps of the round (FedNova's tau_i)
DEVICE_KEY = "device"  # in INFO_RECORD: the node's device class name
# in INFO_RECORD of an identity reply: the node's data-file, "" / -1 without one
DATA_FINGERPRINT_KEY = "data-fingerprint"  # the split fingerprint it was cut with
DATA_PARTITION_KEY = "data-partition-id"  # the partition it holds

# Context.state of a client node
STATE_RUN_KEY = "velocity-run"  # the STATE_DIR_KEY the kept velocity belongs to

# the width sub-model methods a client can run (fedneq.federation.width_client)
WIDTH_METHODS = ("heterofl", "fjord", "fedrolex")

# the element-wise sub-model methods a client can run (fedneq.federation.element_client)
ELEMENT_METHODS = ("fiarse",)
