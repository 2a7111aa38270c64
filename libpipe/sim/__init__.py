"""The discrete-event simulator: placement algorithms on scenarios, CPU only.

It drives the same placement and routing code the live system runs
(``libpipe.placement``) over a virtual clock; scenarios are data files
(``scenarios/*.json``). ``libpipe simulate`` is its command line.

- ``load_scenario(name_or_path)`` -> ``Scenario`` (a ``PlacementProblem``
  plus session costs and a duration); ``builtin_scenarios()``.
- ``compare(scenario, ["petals", "cg-bp", ...], seed=)`` -> ``Comparison``:
  every algorithm on the same sessions; ``comparison_table``,
  ``comparison_json``, ``plot_comparison`` report it.
- ``Simulation(scenario, placement, router).run(sessions)`` ->
  ``SessionOutcome`` per session, for one placement and any router;
  ``generate_sessions``, ``summarize``.
"""

from ._metrics import Summary as Summary, summarize as summarize
from ._report import (
    comparison_json as comparison_json,
    comparison_table as comparison_table,
    plot_comparison as plot_comparison,
)
from ._run import (
    AlgorithmResult as AlgorithmResult,
    Comparison as Comparison,
    compare as compare,
    router_for as router_for,
)
from ._scenario import (
    Scenario as Scenario,
    SessionCosts as SessionCosts,
    builtin_scenarios as builtin_scenarios,
    load_scenario as load_scenario,
    scenario_from_dict as scenario_from_dict,
)
from ._simulator import Router as Router, SessionOutcome as SessionOutcome, Simulation as Simulation
from ._workload import SessionRequest as SessionRequest, generate_sessions as generate_sessions
