"""Typed, validated run configuration, parsed once at the boundary.

A run is described by one TOML file with these tables (every key optional;
see ``sims/configs/default.toml``)::

    [run]        name, seed, rounds, num_clients, clients_per_round, min_replies,
                 round_timeout_s, round_deadline_s, out_dir, participants, excluded,
                 eval_every, class_accuracy
    [data]       dataset, root, image_size, partition, alpha, classes_per_client,
                 min_partition_size, probe_size, test_fraction, classes,
                 train_limit, test_limit
    [model]      name, width_mult, checkpoint, pretrain_epochs, head
    [selection]  selector, rule, initializer, scheme, velocity_mode, mu, storage_dtype
    [train]      optimizer, lr, momentum, weight_decay, backward, grad_filter_last_k,
                 bn_stats
    [strategy]   name, options (a table passed to the strategy's constructor)
    [fleet]      preset ("default" | "homogeneous" | "custom" | "csv"), budget,
                 local_epochs, local_steps, batch_size, classes (array of tables, see
                 fedneq.federation.devices), csv (per-device CSV, fedneq.federation.devices.read_fleet_csv),
                 reference_gflops (fedneq.federation.timing)
    [faults]     crash_prob, straggler_prob, straggler_delay_s
    [simulation] cpus_per_client, ray_address

Unknown tables or keys, names that no registry knows (selector, dataset,
model, scheme) and values of the wrong type are rejected in one line naming the
table, key, value and what is allowed, with a "did you mean" for near misses.

Composition: a file may start from another with a top-level
``extends = "default"`` (a file path relative to it, or a name searched in
``search_dirs``: ``sims`` passes ``sims/configs/``); its own tables are merged
into the base's key by key. ``overrides`` (``--set section.key=value``) are
applied last. A key that the file or an override sets but that has no effect
under the chosen settings (``[fleet] budget`` without the ``homogeneous``
preset, ``[data] alpha`` under an ``iid`` partition, ...) is an error, not
silence (unless it is set to its default value). Without ``extends`` a file starts from the code defaults (:mod:`fedneq.config.schema`).

The resolved config is plain JSON (``Config.to_dict``): the server sends it to every client
with the first message, so a ClientApp needs no other configuration source.
"""

from fedneq.config.loader import apply_overrides, load_config, parse_assignment
from fedneq.config.schema import Config

__all__ = ["Config", "apply_overrides", "load_config", "parse_assignment"]
