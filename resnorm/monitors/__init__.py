"""Monitors: what a run measures beyond its loss, as :class:`resnorm.monitors.probes.Probe` subclasses (rows
of ``layers.parquet``, one per (layer, sublayer) and quantity) or as summary fields.

Weight and optimizer side (:mod:`resnorm.monitors.weights`; builder
``weight_probes(model, optimizer, train_cfg)``, all off with ``train.probes=false``):

- :class:`~resnorm.monitors.weights.ParamNormProbe`: ``param_norm`` (every ``train.log_every``);
- :class:`~resnorm.monitors.weights.OptimizerStateProbe`: ``adam_m_norm``, ``adam_v_norm`` (every
  ``train.log_every``, after the step);
- :class:`~resnorm.monitors.weights.UpdateProbe`: ``update_norm``, ``update_grad_cos`` (every
  ``train.probe_every`` and the last step);
- :class:`~resnorm.monitors.weights.LearnedScalarProbe`: ``rezero_alpha``, ``admin_omega_mean``,
  ``admin_omega_min``, ``admin_omega_max``, ``dyt_alpha`` (every ``train.log_every``; only those the
  variant has; more with :func:`~resnorm.monitors.weights.register_scalar`).

Cost (:mod:`resnorm.monitors.cost`, summary fields, not per layer): ``flops_per_token``,
``peak_flops``, ``peak_flops_source``, ``mfu``, ``peak_memory_bytes``
(:func:`~resnorm.monitors.cost.cost_summary`).

Forward side: :mod:`resnorm.monitors.forward` (its own docstring lists its quantities).

Scheme side (:mod:`resnorm.monitors.schemes`, the multi-stream and cross-layer residuals; builder ``scheme_probes(model, train_cfg)``,
only for the variants that have the quantities): the composite gain of the HC/mHC mixing matrices
(``hc_row_gain``, ``hc_col_gain``, ``hc_composite_row_gain``, ``hc_composite_col_gain``), what each
stream carries (``hc_stream_share_<s>``, ``hc_stream_entropy``) and the
AttnRes depth weights (``attnres_w_embed``, ``attnres_w_last``, ``attnres_entropy``,
``attnres_query_norm``) every ``train.probe_every``; DenseFormer's ``dwa_alpha_self``,
``dwa_alpha_embed``, ``dwa_alpha_rest`` and the learned value-mix ``value_lambda1``,
``value_lambda2`` every ``train.log_every``.

Every per-layer quantity is declared once, with its unit, the sublayers it exists for, how a block's
sublayers combine in the figures and a one-line description, in :mod:`resnorm.runs.quantities` (torch-free:
the analysis and the loggers read it; docs/monitors.md is generated from it). The exact definitions are
in each module's docstring.
"""
