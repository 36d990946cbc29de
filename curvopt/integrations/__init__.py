"""Adapters to other libraries' trainers; each submodule imports its library only when imported.

* :mod:`curvopt.integrations.trl`: :class:`~curvopt.integrations.trl.CAPOGRPOTrainer`, CAPO
  token masking inside TRL's ``GRPOTrainer`` (needs the ``curvopt[trl]`` extra), built on
  :mod:`curvopt.capo`. Its toy problem (addition prompts, a tiny GPT-2) is
  :mod:`curvopt.bench.tasks.trl_addition`.

Nothing in the core package imports this package.
"""
