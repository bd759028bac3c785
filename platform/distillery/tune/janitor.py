"""Free the CPUs of trials ASHA stopped: remove placement groups whose creating actor has died.

When ASHA stops a trial, Tune ends the trial's actor and with it the Ray Train controller that
owns the workers' placement group. GCS frees a group only once its creator's job has ended too,
and Train's own cleaner asks the dashboard's state API, which a local Ray without a dashboard
(or a machine with several Ray instances) cannot answer: every stopped trial would keep its CPUs
and the search would stall waiting for them. The GCS table read is in ray_compat.py.
"""

from __future__ import annotations

import time

from distillery.ray_compat import orphaned_placement_groups


def remove_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor has died; returns how many were removed."""
    from ray.util.placement_group import remove_placement_group

    groups = orphaned_placement_groups()
    for pg in groups:
        remove_placement_group(pg)
    return len(groups)


def placement_group_janitor(every_s: float = 2.0):
    """A Tune callback that runs `remove_orphaned_placement_groups` every `every_s` seconds."""
    from ray.tune import Callback

    class PlacementGroupJanitor(Callback):
        def __init__(self):
            self.last = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.last >= every_s:
                self.last = time.monotonic()
                remove_orphaned_placement_groups()

    return PlacementGroupJanitor()
