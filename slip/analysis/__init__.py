"""Analysis of learned representations: how invariant they are (``slip invariance``).

:mod:`slip.analysis.invariance` computes the Top-K Representation Invariance Score,
:mod:`slip.analysis.sets` reads invariance sets and their trajectories,
:mod:`slip.analysis.features` loads models and takes the representation of a layer,
:mod:`slip.analysis.render` renders the generated set, :mod:`slip.analysis.cli` is the command.
"""
