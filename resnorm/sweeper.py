"""State shared between the resnorm sweeper plugin and the entry point.

The sweeper itself is a Hydra plugin and so must live in ``hydra_plugins/resnorm_sweeper``.
"""

from collections import Counter

#: statuses of the jobs of the last sweep run in this process (read by run.py for the exit code)
LAST_OUTCOME: Counter = Counter()
