"""Toy tasks that the CAPO studies, tests and examples run (one module per task).

* :mod:`~curvopt.bench.tasks.addition`: write the sum of two numbers as digits (GRPO toy).
* :mod:`~curvopt.bench.tasks.recall`: recall one prompt token (the case CAPO's last-layer model is
  built for).
* :mod:`~curvopt.bench.tasks.trl_addition`: the addition task for TRL (character tokenizer, a
  random GPT-2; needs the ``curvopt[trl]`` extra).

They live inside the package, not in ``benchmarks/``, because the example ``examples/capo_trl.py``
and the CAPO guide's code run them outside a source checkout, and the deprecated old paths
of the tasks (under ``curvopt.rl`` and ``curvopt.integrations``) must keep resolving for one
release. Nothing is re-exported here, so importing one task never pulls in another task's
dependencies.
"""
