"""Analysis of learned representations and of what makes them: how invariant they are
(``slip invariance``) and how they depend on data and method (``slip study``).

:mod:`slip.analysis.invariance` computes the Top-K Representation Invariance Score,
:mod:`slip.analysis.sets` reads invariance sets and their trajectories,
:mod:`slip.analysis.features` loads models and takes the representation of a layer,
:mod:`slip.analysis.render` renders the generated set, :mod:`slip.analysis.cli` is the command.
:mod:`slip.analysis.study` runs a study (:mod:`~slip.analysis.study_spec` its spec and grid,
:mod:`~slip.analysis.study_data` the example's data, :mod:`~slip.analysis.study_eval` the
evaluations, :mod:`~slip.analysis.study_report` tables and plots);
:mod:`slip.analysis.plotting` gives matplotlib to both commands' charts.
"""
