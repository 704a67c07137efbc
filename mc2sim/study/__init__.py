"""Studies of a scenario: its plans simulated on a topology, or its op run for real on ranks.

One pipeline from a scenario to a timeline, whichever side runs it:

* :mod:`mc2sim.study.simulate`: scenario -> every rank's plan per tiling (the op's spec) ->
  the cost model -> one Timeline (``mc2sim simulate``, ``sweep``). No MPI, no ops.
* :mod:`mc2sim.study.measure`: scenario -> every rank's inputs and golden (the op's spec) ->
  the real op under each tiling, timed in interleaved rounds -> one Timeline and verdicts
  (``mc2sim run``).
* :mod:`mc2sim.study.calibrate` and :mod:`mc2sim.study.validate`: the measured side on the
  calibration and validation scenario files, fitted (:mod:`mc2sim.model.fit`) or compared
  with the simulated side.

Only the simulated side is imported here; import the measured modules by name.
"""

from mc2sim.study.simulate import (
    StudyResult,
    manifest_of,
    plans_for,
    simulate_study,
    write_results,
)

__all__ = [
    "StudyResult",
    "manifest_of",
    "plans_for",
    "simulate_study",
    "write_results",
]
